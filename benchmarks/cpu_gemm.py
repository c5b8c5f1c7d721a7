"""The CPU backend's GEMM (`cpu_gemm.matmul_nt`) against NumPy's BLAS, at SmolLM2-135M's shapes.

    python benchmarks/cpu_gemm.py                 # rows 1, 16, 64, 2048
    python benchmarks/cpu_gemm.py --rows 16 --cold

x [M, K] @ w [N, K].T for the fused QKV, O, fused gate/up and down projections. With --cold each
shape cycles through 30 copies of w (one per layer, ~100 MB, more than the L3), as a decode step
does; otherwise w stays in cache. Each side is timed in its own pass, NumPy's last, so that
OpenBLAS's spinning threads do not land on Numba's measurement.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from cupaged.backend.cpu import CpuOps
from cupaged.cli.bench import machine_name

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)


def gflops(fn, x, ws, budget_flop: float = 3e9) -> float:
    """Mean GF/s of fn(x, w) over ws, repeated to about budget_flop."""
    flop = 2 * x.shape[0] * ws[0].size
    reps = max(2, int(budget_flop / (flop * len(ws))))
    for w in ws:
        fn(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        for w in ws:
            fn(x, w)
    return flop * reps * len(ws) / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 2048])
    ap.add_argument("--cold", action="store_true", help="30 copies of each weight (out of cache)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ops = CpuOps()
    print(f"{machine_name()}, {numba.get_num_threads()} Numba threads ({'cold' if args.cold else 'hot'} weights), GF/s")
    cases = [(m, name, [rng.standard_normal((n, k), dtype=np.float32) for _ in range(30 if args.cold else 1)],
              rng.standard_normal((m, k), dtype=np.float32))
             for m in args.rows for name, (n, k) in SHAPES.items()]
    ours = [gflops(ops.linear, x, ws) for _, _, ws, x in cases]
    blas = [gflops(lambda a, w: np.matmul(a, w.T), x, ws) for _, _, ws, x in cases]  # after: its threads spin on
    print(f"{'rows':>5} {'shape':8} {'matmul_nt':>10} {'numpy':>8}")
    for (m, name, _, _), a, b in zip(cases, ours, blas):
        print(f"{m:5d} {name:8} {a:10.1f} {b:8.1f}")

if __name__ == "__main__":
    main()
