"""What one Numba parallel call costs before any work: a `prange` over 64 trivial iterations.

    python benchmarks/prange_overhead.py                                # the layer cupaged picks (omp)
    NUMBA_THREADING_LAYER=workqueue python benchmarks/prange_overhead.py

A CPU decode step of SmolLM2 makes ~150 parallel calls (4 GEMMs and one attention per layer,
the LM head), so this cost times 150 is what the threading layer adds to every step.
"""
from __future__ import annotations

import time

import numba
import numpy as np

import cupaged.backend.cpu_math  # noqa: F401  (sets the threading-layer priority cupaged uses)


@numba.njit(parallel=True)
def _touch(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1.0


def main() -> None:
    a = np.zeros(64, np.float32)
    _touch(a)
    calls = 2000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            _touch(a)
        best = min(best, (time.perf_counter() - start) / calls)
    print(f"layer {numba.threading_layer()}, {numba.get_num_threads()} threads: {best * 1e6:.1f} us per parallel call")


if __name__ == "__main__":
    main()
