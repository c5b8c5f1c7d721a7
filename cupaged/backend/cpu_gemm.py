"""The CPU backend's GEMM, x [M, K] @ w [N, K].T, in Numba rather than NumPy's BLAS.

Why not BLAS: (1) with a decode step's few rows, OpenBLAS packs every weight panel before using
it once; (2) its worker threads keep spinning after each call, where they fight the Numba threads
of the next kernel for the same cores (one thread pool per step is the fix); (3) on this project's
machines numpy's OpenBLAS is pinned to its AVX2 kernels (OPENBLAS_CORETYPE). Measured on the
2-core AMD EPYC, 2 threads, SmolLM2 shapes (`python benchmarks/cpu_gemm.py [--cold]`): 16 rows
300-330 GF/s with w in cache (NumPy 120-150), 170-210 with w streamed from memory (NumPy 105-110);
2048 rows 230-330 GF/s (NumPy 250-260); 1 row about even.

How: each thread takes runs of BLOCK_PANELS 4-row panels of w straight from memory (no packing;
a decode step reads the weights once) and multiplies them by every row of x, 4 x 4 outputs at a
time: 16 float32 accumulators, each a SIMD register of partial sums over K, reduced at the end.
The first 4 rows of x stream a run in address order; the other rows find it in L2.
"""
from __future__ import annotations

import numba
import numpy as np

from cupaged.backend.cpu_math import FASTMATH

BLOCK_PANELS = 32  # 4-row panels of w per work item (~300 KB of w at K = 576: it stays in L2)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _tile4x4(x, w, out, m0, n0):
    """out[m0:m0+4, n0:n0+4] = x[m0:m0+4] @ w[n0:n0+4].T."""
    x0, x1, x2, x3 = x[m0], x[m0 + 1], x[m0 + 2], x[m0 + 3]
    w0, w1, w2, w3 = w[n0], w[n0 + 1], w[n0 + 2], w[n0 + 3]
    z = np.float32(0.0)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = z
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = z
    for k in range(x.shape[1]):
        a0, a1, a2, a3 = x0[k], x1[k], x2[k], x3[k]
        b0, b1, b2, b3 = w0[k], w1[k], w2[k], w3[k]
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3
        s20 += a2 * b0
        s21 += a2 * b1
        s22 += a2 * b2
        s23 += a2 * b3
        s30 += a3 * b0
        s31 += a3 * b1
        s32 += a3 * b2
        s33 += a3 * b3
    out[m0, n0], out[m0, n0 + 1], out[m0, n0 + 2], out[m0, n0 + 3] = s00, s01, s02, s03
    out[m0 + 1, n0], out[m0 + 1, n0 + 1], out[m0 + 1, n0 + 2], out[m0 + 1, n0 + 3] = s10, s11, s12, s13
    out[m0 + 2, n0], out[m0 + 2, n0 + 1], out[m0 + 2, n0 + 2], out[m0 + 2, n0 + 3] = s20, s21, s22, s23
    out[m0 + 3, n0], out[m0 + 3, n0 + 1], out[m0 + 3, n0 + 2], out[m0 + 3, n0 + 3] = s30, s31, s32, s33


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _tile1x4(x, w, out, m, n0):
    """out[m, n0:n0+4] = x[m] @ w[n0:n0+4].T (the rows of x past the last multiple of 4)."""
    xr, w0, w1, w2, w3 = x[m], w[n0], w[n0 + 1], w[n0 + 2], w[n0 + 3]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for k in range(x.shape[1]):
        a = xr[k]
        s0 += a * w0[k]
        s1 += a * w1[k]
        s2 += a * w2[k]
        s3 += a * w3[k]
    out[m, n0], out[m, n0 + 1], out[m, n0 + 2], out[m, n0 + 3] = s0, s1, s2, s3


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _row_by_panel(x, w, out, m, n0, n1):
    """out[m, n0:n1] = x[m] @ w[n0:n1].T, one output at a time (the last N % 4 columns)."""
    xr = x[m]
    for n in range(n0, n1):
        wr = w[n]
        s = np.float32(0.0)
        for k in range(x.shape[1]):
            s += xr[k] * wr[k]
        out[m, n] = s


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _panel_rows(x, w, out, m0, m1, p):
    """out[m0:m1, 4p:4p+4] (fewer columns for the last panel when N % 4 != 0)."""
    n0 = 4 * p
    n1 = min(n0 + 4, w.shape[0])
    if m1 - m0 == 4 and n1 - n0 == 4:
        _tile4x4(x, w, out, m0, n0)
    elif n1 - n0 == 4:
        for m in range(m0, m1):
            _tile1x4(x, w, out, m, n0)
    else:
        for m in range(m0, m1):
            _row_by_panel(x, w, out, m, n0, n1)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def matmul_nt(x, w, out, threads):
    """x [M, K] @ w [N, K].T -> out [M, N], all float32 and C-contiguous; threads: Numba's
    thread count (numba.get_num_threads(), passed in: reading it here would defeat the disk cache).

    Work items are runs of about BLOCK_PANELS panels, as many per thread. Within one, every
    4 rows of x sweep the whole run: the first sweep reads the run from memory in address order,
    the others find it in L2 (~20% faster from memory than finishing one panel at a time, in a
    throwaway experiment on the 2-core EPYC that is not kept in the repo).
    """
    m_n = x.shape[0]
    n_panels = (w.shape[0] + 3) // 4
    n_blocks = threads * max(1, round(n_panels / (threads * BLOCK_PANELS)))
    for blk in numba.prange(n_blocks):
        p0 = blk * n_panels // n_blocks
        p1 = (blk + 1) * n_panels // n_blocks
        for m0 in range(0, m_n, 4):
            m1 = min(m0 + 4, m_n)
            for p in range(p0, p1):
                _panel_rows(x, w, out, m0, m1, p)
