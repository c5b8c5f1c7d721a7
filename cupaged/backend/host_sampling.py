"""The host's top-k / top-p rule (NumPy only, so the CUDA path imports no Numba for it)."""
from __future__ import annotations

import numpy as np


def top_k_top_p_keep(row: np.ndarray, weights: np.ndarray, k: int, p: float) -> np.ndarray:
    """The tokens top-k then top-p allow, with cuda/sampling.cu's tie rule: every token tied with the
    k-th largest logit stays, and so does every token tied with the one at which the mass of the
    largest reaches p of the top-k set's mass. row [V] float64 logits (NaN already -inf), weights [V]
    their unnormalised probabilities; k <= 0 or >= V and p >= 1 disable each filter. -> keep [V] bool.
    The one host implementation: CpuOps.sample and the Sampler's host path both use it."""
    v_n = row.size
    keep = np.ones(v_n, dtype=bool)
    if 0 < k < v_n:
        keep = row >= np.partition(row, v_n - k)[v_n - k]
    if p < 1.0:
        idx = np.flatnonzero(keep)
        vals = row[idx]
        order = np.argsort(-vals, kind="stable")
        cum = np.cumsum(weights[idx][order])
        cut = min(int(np.searchsorted(cum, p * cum[-1])), len(cum) - 1)  # first cum >= p * Z
        keep &= row >= vals[order[cut]]
    return keep
