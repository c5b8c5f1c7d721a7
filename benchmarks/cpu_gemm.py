"""The CPU backend's GEMM (`cpu_gemm.matmul_nt`) against NumPy's BLAS, at SmolLM2-135M's shapes.

    python benchmarks/cpu_gemm.py                 # rows 1, 16, 64, 2048; float32 and bfloat16 weights
    python benchmarks/cpu_gemm.py --rows 1 16 --cold
    python benchmarks/cpu_gemm.py --rows 512 --dtypes float32 --offset 0    # rows on a cache line (16: off it)
    python benchmarks/cpu_gemm.py --rows 1 --cold --dtypes q8_0 q8_0-float-x   # int8 activations, or not

x [M, K] @ w [N, K].T for the fused QKV, O, fused gate/up and down projections, w float32,
bfloat16 (uint16 bits, widened in registers) or q8_0 (int8 + a float32 scale per 32, cpu_quant; on AVX-512
VNNI CPUs, up to 4 rows of x go as int8, cpu_vnni; q8_0-float-x keeps them float32). With --cold each shape cycles through 30 copies of w
(one per layer, ~100 MB, more than the L3), as a decode step does; otherwise w stays in cache.
Prints GF/s and GB/s of weights streamed (w's bytes per call / time: the figure a decode step is
bound by). Each side is timed in its own pass, NumPy's (float32 only) last, so that OpenBLAS's
spinning threads do not land on Numba's measurement.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cpu_quant import matmul_q8, quantize_q8_0
from cupaged.cli.bench import machine_name
from cupaged.util import float_to_bf16_bits

CONVERT = {"float32": lambda w: w, "bfloat16": lambda w: float_to_bf16_bits(np, w), "q8_0": quantize_q8_0,
           "q8_0-float-x": quantize_q8_0}
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (N, K)


def gflops(fn, x, ws, budget_flop: float = 3e9) -> tuple[float, float]:
    """Mean (GF/s, GB/s of w) of fn(x, w) over ws, repeated to about budget_flop."""
    flop = 2 * x.shape[0] * ws[0].shape[0] * ws[0].shape[1]
    reps = max(2, int(budget_flop / (flop * len(ws))))
    for w in ws:
        fn(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        for w in ws:
            fn(x, w)
    seconds = time.perf_counter() - start
    return flop * reps * len(ws) / seconds / 1e9, ws[0].nbytes * reps * len(ws) / seconds / 1e9


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of a whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 64 + offset, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def q8_float_x(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a Q8Matrix w with float32 activations at any row count (no int8 x)."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    matmul_q8(x, w.q, w.scale, out, numba.get_num_threads(), False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 2048])
    ap.add_argument("--cold", action="store_true", help="30 copies of each weight (out of cache)")
    ap.add_argument("--dtypes", nargs="+", default=list(CONVERT), choices=list(CONVERT))
    ap.add_argument("--offset", type=int, default=None,
                    help="float32 only: put x and w this many bytes past a 64-byte boundary (0: on it; 16: where "
                         "NumPy's own allocations may start), to measure what unaligned rows cost")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ops = CpuOps()
    print(f"{machine_name()}, {numba.get_num_threads()} Numba threads ({'cold' if args.cold else 'hot'} weights)")
    cases = []
    for m in args.rows:
        for name, (n, k) in SHAPES.items():
            ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(30 if args.cold else 1)]
            x = rng.standard_normal((m, k), dtype=np.float32)
            for dtype in args.dtypes:
                conv = [CONVERT[dtype](w) for w in ws]
                if args.offset is not None and dtype == "float32":
                    conv, x = [at_offset(w, args.offset) for w in conv], at_offset(x, args.offset)
                cases.append((m, name, dtype, conv, x))
    ours = [gflops(q8_float_x if dtype == "q8_0-float-x" else ops.linear, x, ws) for _, _, dtype, ws, x in cases]
    blas = [gflops(lambda a, w: np.matmul(a, w.T), x, ws) if dtype == "float32" else (float("nan"),) * 2
            for _, _, dtype, ws, x in cases]  # after: its threads spin on
    print(f"{'rows':>5} {'shape':8} {'weights':12} {'matmul_nt GF/s':>14} {'GB/s':>6} {'numpy GF/s':>11} {'GB/s':>6}")
    for (m, name, dtype, _, _), (a, a_bw), (b, b_bw) in zip(cases, ours, blas):
        print(f"{m:5d} {name:8} {dtype:12} {a:14.1f} {a_bw:6.1f} {b:11.1f} {b_bw:6.1f}")


if __name__ == "__main__":
    main()
