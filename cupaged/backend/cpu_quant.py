"""8-bit weight-only matrices for the CPU backend, Q8_0-style: int8 values with one float32 scale per
block of 32 along K (llama.cpp's Q8_0 keeps the scale in float16; float32 costs 1/32 byte more per
weight and no conversion). A weight streams 1.125 bytes instead of float32's 4: a decode step,
which reads every weight once, moves about 3.6x fewer bytes.

    w ~= q * scale[:, k // 32]        q [N, K] int8 in [-127, 127], scale [N, K / 32] float32

`matmul_q8(x, q, scale, out, threads)` is x [M, K] float32 @ w.T with float32 products and sums:
for M <= SIMD_ROWS (decode of a few streams) each thread walks its rows of q in order, 4 at a time,
through the explicit-SIMD row kernel of `cpu_simd` (2.5x the GF/s of the Numba loop it replaced), or,
on CPUs with AVX-512 VNNI, with x quantized to int8 and int32 dot products (`cpu_vnni`);
for more, each work item first widens its run of rows into a float32 buffer that stays in L2, then
runs the float32 GEMM's tiles over it (`cpu_gemm`), so the widening is paid once per run, not once
per 4 rows of x.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from cupaged.backend.cpu_gemm import PANEL_ROWS, sweep, work_items
from cupaged.backend.cpu_math import FASTMATH
from cupaged.backend.cpu_simd import QBLOCK, q8_rows1, q8_rows4  # QBLOCK: weights per scale, along K
from cupaged.backend.cpu_vnni import STEP, VNNI, quantize_x, vnni_rows1, vnni_rows4
from cupaged.util import aligned_empty

SIMD_ROWS = 4  # up to this many rows of x, the rows-in-order SIMD walk; more: widen, then float32 tiles


@dataclass(frozen=True)
class Q8Matrix:
    """A weight matrix [N, K] as int8 blocks of QBLOCK with a float32 scale each."""
    q: np.ndarray      # [N, K] int8
    scale: np.ndarray  # [N, K // QBLOCK] float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    dtype = np.dtype(np.int8)

    def __post_init__(self):
        # matmul_q8's SIMD walk reads rows through raw pointers: the layout is checked here, once
        n, k = self.q.shape
        if (self.q.dtype != np.int8 or self.scale.dtype != np.float32 or k % QBLOCK
                or self.scale.shape != (n, k // QBLOCK)
                or not (self.q.flags.c_contiguous and self.scale.flags.c_contiguous)):
            raise ValueError(f"Q8Matrix wants q int8 [N, K] (K a multiple of {QBLOCK}) and scale float32 "
                             f"[N, K / {QBLOCK}], both C-contiguous; got q {self.q.dtype} {self.q.shape}, "
                             f"scale {self.scale.dtype} {self.scale.shape}")

    def dequantize(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float32 values of the given rows (all by default)."""
        q, s = self.q[rows], self.scale[rows]
        return (q.reshape(*q.shape[:-1], -1, QBLOCK) * s[..., None]).reshape(q.shape).astype(np.float32)


def quantize_q8_0(w, chunk_rows: int = 4096) -> Q8Matrix:
    """float32 [N, K] (K a multiple of QBLOCK) -> Q8Matrix: per block, scale = max |w| / 127 and
    q = round(w / scale). Converted chunk_rows rows at a time, so temporaries stay small."""
    w = np.asarray(w)
    n, k = w.shape
    if k % QBLOCK:
        raise ValueError(f"q8_0 needs K a multiple of {QBLOCK}, got a [{n}, {k}] matrix")
    q, scale = aligned_empty((n, k), np.int8), aligned_empty((n, k // QBLOCK), np.float32)
    for r in range(0, n, chunk_rows):
        blocks = np.asarray(w[r:r + chunk_rows], np.float32).reshape(-1, k // QBLOCK, QBLOCK)
        s = np.abs(blocks).max(axis=2) / 127
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q[r:r + chunk_rows] = np.rint(blocks * inv[..., None]).reshape(-1, k)
        scale[r:r + chunk_rows] = s
    return Q8Matrix(q, scale)


@numba.njit(cache=True, nogil=True, inline="always")
def _q8_rows_in_order(x, q, scale, out, n0, n1):
    """out[:, n0:n1] for few rows of x: 4 rows of q at a time (cpu_simd), each row of x in turn
    (the 4 rows stay in L1 between them)."""
    nb = scale.shape[1]
    qs, ss, xs, os = q.strides[0], scale.strides[0], x.strides[0], out.strides[0]
    qp, sp, xp, op = q.ctypes.data, scale.ctypes.data, x.ctypes.data, out.ctypes.data
    n = n0
    while n < n1:
        if n + 4 <= n1:
            for m in range(x.shape[0]):
                q8_rows4(xp + m * xs, qp + n * qs, qs, sp + n * ss, ss, nb, op + m * os + 4 * n)
            n += 4
        else:
            for m in range(x.shape[0]):
                q8_rows1(xp + m * xs, qp + n * qs, qs, sp + n * ss, ss, nb, op + m * os + 4 * n)
            n += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _vnni_rows_in_order(xq, dx, q, scale, out, n0, n1):
    """_q8_rows_in_order with x already quantized (cpu_vnni): int8 dot products by vpdpbusd."""
    steps = q.shape[1] // STEP
    qs, ss, xs, ds, os = q.strides[0], scale.strides[0], xq.strides[0], dx.strides[0], out.strides[0]
    qp, sp, xp, dp, op = q.ctypes.data, scale.ctypes.data, xq.ctypes.data, dx.ctypes.data, out.ctypes.data
    n = n0
    while n < n1:
        if n + 4 <= n1:
            for m in range(xq.shape[0]):
                vnni_rows4(xp + m * xs, dp + m * ds, qp + n * qs, qs, sp + n * ss, ss, steps, op + m * os + 4 * n)
            n += 4
        else:
            for m in range(xq.shape[0]):
                vnni_rows1(xp + m * xs, dp + m * ds, qp + n * qs, qs, sp + n * ss, ss, steps, op + m * os + 4 * n)
            n += 1


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _widen_rows(q, scale, r0, r1, buf):
    """buf[:r1 - r0] = float32 values of rows r0:r1."""
    bs = q.shape[1] // scale.shape[1]  # at run time, as above
    for r in range(r0, r1):
        qr, sr, br = q[r], scale[r], buf[r - r0]
        for b in range(scale.shape[1]):
            s = sr[b]
            qb, bb = qr[b * bs:b * bs + bs], br[b * bs:b * bs + bs]
            for j in range(bs):
                bb[j] = np.float32(qb[j]) * s


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def matmul_q8(x, q, scale, out, threads, int8_x=VNNI):
    """x [M, K] float32 @ (q [N, K] int8 * scale [N, K / 32] float32).T -> out [M, N] float32, all
    C-contiguous; threads: Numba's thread count (passed in, as for cpu_gemm.matmul_nt). int8_x (where
    the CPU has AVX-512 VNNI, and K a multiple of 64): for M <= SIMD_ROWS, x quantized to int8 per
    block of 32 and int32 dot products (cpu_vnni), as llama.cpp's Q8_0; else float32 throughout."""
    m_n, n_rows, k = x.shape[0], q.shape[0], q.shape[1]
    if m_n <= SIMD_ROWS and int8_x and k % STEP == 0:
        xq, dx = np.empty((m_n, k), np.int8), np.empty((m_n, k // 4), np.float32)
        quantize_x(x, xq, dx)
        for t in numba.prange(threads):
            _vnni_rows_in_order(xq, dx, q, scale, out, t * n_rows // threads, (t + 1) * n_rows // threads)
        return
    if m_n <= SIMD_ROWS:
        for t in numba.prange(threads):
            _q8_rows_in_order(x, q, scale, out, t * n_rows // threads, (t + 1) * n_rows // threads)
        return
    n_panels, n_blocks = work_items(n_rows, threads)
    for blk in numba.prange(n_blocks):
        p0 = blk * n_panels // n_blocks
        p1 = (blk + 1) * n_panels // n_blocks
        r0, r1 = p0 * PANEL_ROWS, min(p1 * PANEL_ROWS, n_rows)
        raw = np.empty((r1 - r0) * k + 16, np.float32)
        start = (-raw.ctypes.data % 64) // 4  # on a cache line, for the tile's vector loads
        buf = raw[start:start + (r1 - r0) * k].reshape(r1 - r0, k)
        _widen_rows(q, scale, r0, r1, buf)
        sweep(x, buf, out[:, r0:r1], 0, p1 - p0)
