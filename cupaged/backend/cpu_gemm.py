"""The CPU backend's GEMM, x [M, K] @ w [N, K].T, in Numba rather than NumPy's BLAS; w float32 or
bfloat16 bits (uint16, widened in registers, float32 products and sums).

Why not BLAS: (1) with a decode step's few rows, OpenBLAS packs every weight panel before using
it once; (2) its worker threads keep spinning after each call, where they fight the Numba threads
of the next kernel for the same cores (one thread pool per step is the fix); (3) it has no
bfloat16 weights. `python benchmarks/cpu_gemm.py [--cold]` measures it against NumPy
(docs/results.md has the figures and the CPU each came from).

How, for M >= 2: each thread takes runs of panels of w (PANEL_ROWS rows each) straight from memory
(no packing: a decode step reads the weights once) and multiplies them by every row of x, TILE_M
rows of x (6 with AVX-512, 4 with AVX2) by one panel at a time, each output a SIMD register of
partial sums over K reduced at the end. The first TILE_M rows of x stream a run in address order;
the others find it in L2. The panel is
4 rows of w where the CPU has AVX-512 (32 vector registers hold 16 accumulators; the tile is
cpu_simd's explicit-SIMD one, ~1.3x the Numba tile there) and 2 with AVX2 (16 registers: 4 x 4
accumulators spill, 4 x 2 do not; 1.5-2.5x faster at 512 rows on a Zen 3).
For M == 1 (one decode stream) each thread walks its rows of w one after the other, one address-
ordered stream, 4 rows at a time through cpu_simd's row kernel, which prefetches the next 4 rows
(K a multiple of 32; otherwise the Numba loop `_rows_in_order`).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from cupaged.backend.cpu_math import FASTMATH
from cupaged.backend.cpu_simd import (QBLOCK, TILE_LANES, TILE_M, TILE_N, dot_rows1, dot_rows4, tile,
                                      wide_vectors)

PANEL_ROWS = TILE_N  # rows of w per panel: 4 with AVX-512, 2 with AVX2 (see above)
# cpu_simd's tile where the CPU has AVX-512 (LLVM vectorizes the Numba tiles at half its width);
# with AVX2 the Numba 4 x 2 tile measured ~1.4x faster than the explicit one (Zen 3 code, timed on
# the Intel Xeon with NUMBA_CPU_NAME=znver3)
SIMD_TILES = wide_vectors()
BLOCK_ROWS = 128  # rows of w per work item (~300 KB at K = 576 in float32: it stays in L2)


@intrinsic
def _bf16_as_f32(typingctx, bits):
    """bfloat16 bits (uint16) -> the float32 they are the top half of: zero-extend, shift left 16,
    bitcast (LLVM vectorizes the three over a row)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


def widen(v):
    """A weight element as float32: float32 as is; a uint16 as the bfloat16 it holds."""
    raise NotImplementedError("compiled only")


@overload(widen, inline="always")
def _widen(v):
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:
        return lambda v: _bf16_as_f32(v)
    return None


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
        b0, b1, b2, b3 = widen(w0[k]), widen(w1[k]), widen(w2[k]), widen(w3[k])
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
def _tile4x2(x, w, out, m0, n0):
    """out[m0:m0+4, n0:n0+2] = x[m0:m0+4] @ w[n0:n0+2].T (8 accumulators: fits AVX2's 16 registers)."""
    x0, x1, x2, x3 = x[m0], x[m0 + 1], x[m0 + 2], x[m0 + 3]
    w0, w1 = w[n0], w[n0 + 1]
    z = np.float32(0.0)
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = z
    for k in range(x.shape[1]):
        b0, b1 = widen(w0[k]), widen(w1[k])
        a0, a1, a2, a3 = x0[k], x1[k], x2[k], x3[k]
        s00 += a0 * b0
        s01 += a0 * b1
        s10 += a1 * b0
        s11 += a1 * b1
        s20 += a2 * b0
        s21 += a2 * b1
        s30 += a3 * b0
        s31 += a3 * b1
    out[m0, n0], out[m0, n0 + 1] = s00, s01
    out[m0 + 1, n0], out[m0 + 1, n0 + 1] = s10, s11
    out[m0 + 2, n0], out[m0 + 2, n0 + 1] = s20, s21
    out[m0 + 3, n0], out[m0 + 3, n0 + 1] = s30, s31


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _tile1x4(x, w, out, m, n0):
    """out[m, n0:n0+4] = x[m] @ w[n0:n0+4].T (the rows of x past the last multiple of 4)."""
    xr, w0, w1, w2, w3 = x[m], w[n0], w[n0 + 1], w[n0 + 2], w[n0 + 3]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for k in range(x.shape[1]):
        a = xr[k]
        s0 += a * widen(w0[k])
        s1 += a * widen(w1[k])
        s2 += a * widen(w2[k])
        s3 += a * widen(w3[k])
    out[m, n0], out[m, n0 + 1], out[m, n0 + 2], out[m, n0 + 3] = s0, s1, s2, s3


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _row_by_panel(x, w, out, m, n0, n1):
    """out[m, n0:n1] = x[m] @ w[n0:n1].T, one output at a time (the last N % 4 columns)."""
    xr = x[m]
    for n in range(n0, n1):
        wr = w[n]
        s = np.float32(0.0)
        for k in range(x.shape[1]):
            s += xr[k] * widen(wr[k])
        out[m, n] = s


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _panel_rows(x, w, out, m0, m1, p):
    """out[m0:m1, PANEL_ROWS p : PANEL_ROWS (p+1)] (fewer columns for the last panel): one SIMD tile of
    TILE_M rows where it fits, else 4-row Numba tiles, then a row at a time for the rest."""
    n0 = PANEL_ROWS * p
    n1 = min(n0 + PANEL_ROWS, w.shape[0])
    if SIMD_TILES and m1 - m0 == TILE_M and n1 - n0 == 4 and x.shape[1] % TILE_LANES == 0:
        xs, ws, os = x.strides[0], w.strides[0], out.strides[0]
        tile(w, x.ctypes.data + m0 * xs, xs, w.ctypes.data + n0 * ws, ws, x.shape[1] // TILE_LANES,
             out.ctypes.data + m0 * os + n0 * 4, os)
        return
    m = m0
    while m + 4 <= m1 and n1 - n0 in (2, 4):
        if n1 - n0 == 4:
            _tile4x4(x, w, out, m, n0)
        else:
            _tile4x2(x, w, out, m, n0)
        m += 4
    for r in range(m, m1):
        if n1 - n0 == 4:
            _tile1x4(x, w, out, r, n0)
        else:
            _row_by_panel(x, w, out, r, n0, n1)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _rows_in_order(x, w, out, n0, n1):
    """out[:, n0:n1], one row of w after the other (for M == 1: one address-ordered stream)."""
    for n in range(n0, n1):
        wr = w[n]
        for m in range(x.shape[0]):
            xr = x[m]
            s = np.float32(0.0)
            for k in range(x.shape[1]):
                s += xr[k] * widen(wr[k])
            out[m, n] = s


@numba.njit(cache=True, nogil=True, inline="always")
def _rows_in_order_simd(x, w, out, n0, n1):
    """_rows_in_order through cpu_simd's row kernels, 4 rows of w at a time (K a multiple of 32)."""
    nb = x.shape[1] // QBLOCK
    ws, xs, os = w.strides[0], x.strides[0], out.strides[0]
    wp, xp, op = w.ctypes.data, x.ctypes.data, out.ctypes.data
    n = n0
    while n + 4 <= n1:
        for m in range(x.shape[0]):
            dot_rows4(w, xp + m * xs, wp + n * ws, ws, nb, op + m * os + 4 * n)
        n += 4
    for r in range(n, n1):
        for m in range(x.shape[0]):
            dot_rows1(w, xp + m * xs, wp + r * ws, ws, nb, op + m * os + 4 * r)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def matmul_nt(x, w, out, threads):
    """x [M, K] @ w [N, K].T -> out [M, N], C-contiguous; x and out float32, w float32 or bfloat16
    bits (uint16); threads: Numba's thread count (numba.get_num_threads(), passed in: reading it
    here would defeat the disk cache).

    M == 1: each thread takes N / threads rows of w in order. Otherwise work items are runs of about
    BLOCK_ROWS rows of w (whole panels), as many per thread. Within one, every 4 rows of x sweep the
    whole run: the first sweep reads the run from memory in address order, the others find it in
    L2 (~20% faster from memory than finishing one panel at a time, in a throwaway experiment on
    the 2-core EPYC that is not kept in the repo).
    """
    m_n, n_rows = x.shape[0], w.shape[0]
    if m_n == 1 and x.shape[1] % QBLOCK == 0:
        for t in numba.prange(threads):
            _rows_in_order_simd(x, w, out, t * n_rows // threads, (t + 1) * n_rows // threads)
        return
    if m_n == 1:
        for t in numba.prange(threads):
            _rows_in_order(x, w, out, t * n_rows // threads, (t + 1) * n_rows // threads)
        return
    n_panels, n_blocks = work_items(n_rows, threads)
    for blk in numba.prange(n_blocks):
        sweep(x, w, out, blk * n_panels // n_blocks, (blk + 1) * n_panels // n_blocks)


@numba.njit(cache=True, nogil=True, inline="always")
def work_items(n_rows, threads):
    """(panels of n_rows rows of w, work items: runs of about BLOCK_ROWS rows, a multiple of threads)."""
    n_panels = (n_rows + PANEL_ROWS - 1) // PANEL_ROWS
    return n_panels, threads * max(1, round(n_panels * PANEL_ROWS / (threads * BLOCK_ROWS)))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def sweep(x, w, out, p0, p1):
    """out[:, panels p0:p1] = x @ those rows of w.T: every TILE_M rows of x sweep the whole run."""
    m_n = x.shape[0]
    for m0 in range(0, m_n, TILE_M):
        m1 = min(m0 + TILE_M, m_n)
        for p in range(p0, p1):
            _panel_rows(x, w, out, m0, m1, p)
