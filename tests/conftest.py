"""Shared fixtures: the real default model (converted once per machine) and engines over it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores. Numba's OpenMP
    # threads spin between kernels: two workers of two threads on 2 cores ran the model tests 2.5x
    # slower than one worker alone. The kernel tests still split their work 1-3 ways: they pass that
    # count as the kernels' `threads` argument (the prange split), which this does not limit.
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = _share

from cupaged.weights.catalog import DEFAULT_MODEL  # noqa: E402
from cupaged.weights.store import resolve_model  # noqa: E402

KV_BYTES = 256 * 2**20  # small pools keep the test machine's memory free


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, converted once per machine into the normal cache ($CUPAGED_HOME or ~/.cache/cupaged)."""
    return resolve_model(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def smol_llm(smollm2_dir):
    """An LLM over SmolLM2-135M-Instruct on the CPU backend, shared by the tests of a session."""
    from cupaged.llm import LLM
    return LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=KV_BYTES, max_model_len=2048, progress=False)
