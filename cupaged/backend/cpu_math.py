"""Scalar float32 math for the Numba kernels that LLVM can vectorize.

`math.exp` inside a Numba loop stays a scalar libm call per element (Numba has no vector math
library unless Intel's SVML is installed), which made the exponentials most of SiLU's cost.
`exp_f32` is plain arithmetic instead: e**x = 2**n * 2**f with n an integer and |f| <= 1/2, 2**f
from a degree-7 polynomial (Taylor terms of e**(f ln 2); the first omitted term is < 6e-9) and
2**n built in the float's exponent bits. Inlined into a loop it compiles to SIMD code (SiLU-and-mul
of one MLP at a 2048-token prefill: ~12x faster than NumPy's `np.exp`, `benchmarks/silu_exp.py`,
docs/results.md).
Relative error against float64 is ~1e-6 for |x| <= 20, growing to ~4e-6 by |x| = 87 from rounding
x * log2(e) in float32; arguments are clamped to |x| <= 86.6 (2**+-125), so e**-100 comes out
~2e-38, not 4e-44. The attention softmax uses it too.

It also chooses Numba's threading layer, before any CPU kernel (all import this module) runs.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# fastmath without nnan/ninf: the online softmax starts its running max at -inf.
FASTMATH = {"nsz", "arcp", "contract", "reassoc", "afn"}
LOG2E = np.float32(1.4426950408889634)

# Threading: Numba's OpenMP layer hands a parallel loop to its (briefly spinning) threads in ~1 us;
# the workqueue layer parks and wakes them, ~66 us per call (benchmarks/prange_overhead.py), and a
# decode step makes ~150 such calls. OpenMP's spinning threads used to fight OpenBLAS's for the
# 2 cores (40 vs 86 output tok/s), but the GEMMs now run in Numba too (cpu_gemm), so no BLAS call
# is left in a step. The priority list falls back to workqueue where no OpenMP runtime (libgomp)
# is installed; NUMBA_THREADING_LAYER still overrides. CUPAGED_CPU_GEMM=blas (NumPy's BLAS for the
# GEMMs, see CpuOps) brings back the workqueue layer, whose parked threads leave BLAS's alone.
if "NUMBA_THREADING_LAYER" not in os.environ:
    if os.environ.get("CUPAGED_CPU_GEMM") == "blas":
        numba.config.THREADING_LAYER = "workqueue"
    else:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


@intrinsic
def as_f32(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (a register bitcast, no memory)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def exp_f32(x):
    """e**x in float32, vectorizable; see the module note for its accuracy."""
    t = min(max(x * LOG2E, np.float32(-125.0)), np.float32(125.0))
    n = np.floor(t + np.float32(0.5))
    f = t - n   # [-1/2, 1/2]
    p = np.float32(1.5252733804059840e-5)       # ln(2)**7 / 7!
    p = p * f + np.float32(1.5403530393381606e-4)
    p = p * f + np.float32(1.3333558146428443e-3)
    p = p * f + np.float32(9.6181291076284772e-3)
    p = p * f + np.float32(5.5504108664821580e-2)
    p = p * f + np.float32(2.4022650695910071e-1)
    p = p * f + np.float32(6.9314718055994531e-1)  # ln(2)
    p = p * f + np.float32(1.0)
    return p * as_f32((np.int32(n) + np.int32(127)) << 23)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def silu_and_mul(x, out):
    """x [T, 2I] = [gate | up] -> out [T, I] = gate * sigmoid(gate) * up; threads split T."""
    n = out.shape[1]
    for t in numba.prange(x.shape[0]):
        for i in range(n):
            g = x[t, i]
            out[t, i] = g / (np.float32(1.0) + exp_f32(-g)) * x[t, n + i]
