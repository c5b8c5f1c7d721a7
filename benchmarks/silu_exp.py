"""SiLU-and-mul of one SmolLM2 MLP at a 2,048-token prefill ([2048, 2 x 1536] float32): NumPy's
`np.exp` against CpuOps' Numba kernel with the vectorizable exp of cupaged/backend/cpu_math.py.
Prints ms per call (median of --runs) and GB/s of activations read and written.

    python benchmarks/silu_exp.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cupaged.backend.cpu import CpuOps


def numpy_silu_and_mul(x: np.ndarray) -> np.ndarray:
    gate, up = x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]
    return gate / (1 + np.exp(-gate)) * up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    ops = CpuOps()
    x = np.random.default_rng(0).standard_normal((args.tokens, 2 * args.intermediate)).astype(np.float32)
    np.testing.assert_allclose(ops.silu_and_mul(x), numpy_silu_and_mul(x), rtol=1e-5, atol=1e-6)
    moved = x.nbytes * 1.5  # read [T, 2I], write [T, I]
    for name, fn in (("numpy np.exp", numpy_silu_and_mul), ("numba cpu_math.exp_f32", ops.silu_and_mul)):
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{name:24} {med * 1e3:7.2f} ms per call  {moved / med / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
