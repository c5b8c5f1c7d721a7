"""8-bit weight-only matrices for the CPU backend, Q8_0-style: int8 values with one float32 scale per
block of 32 along K (llama.cpp's Q8_0 keeps the scale in float16; float32 costs 1/32 byte more per
weight and no conversion). A weight streams 1.125 bytes instead of float32's 4: a decode step,
which reads every weight once, moves about 3.6x fewer bytes.

    w ~= q * scale[:, k // 32]        q [N, K] int8 in [-127, 127], scale [N, K / 32] float32

`matmul_q8(x, q, scale, out, threads)` is x [M, K] float32 @ w.T with float32 products and sums:
for M == 1 each thread walks its rows of q in order, each block's 32 products summed then scaled;
for M >= 2 each work item first widens its run of rows into a float32 buffer that stays in L2, then
runs the float32 GEMM's tiles over it (`cpu_gemm`), so the widening is paid once per run, not once
per 4 rows of x.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from cupaged.backend.cpu_gemm import PANEL_ROWS, sweep, work_items
from cupaged.backend.cpu_math import FASTMATH

QBLOCK = 32  # weights per scale, along K


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
    q, scale = np.empty((n, k), np.int8), np.empty((n, k // QBLOCK), np.float32)
    for r in range(0, n, chunk_rows):
        blocks = np.asarray(w[r:r + chunk_rows], np.float32).reshape(-1, k // QBLOCK, QBLOCK)
        s = np.abs(blocks).max(axis=2) / 127
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q[r:r + chunk_rows] = np.rint(blocks * inv[..., None]).reshape(-1, k)
        scale[r:r + chunk_rows] = s
    return Q8Matrix(q, scale)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _q8_rows_in_order(x, q, scale, out, n0, n1):
    """out[:, n0:n1] for few rows of x, one row of q after the other."""
    nb = scale.shape[1]
    bs = q.shape[1] // nb  # QBLOCK, read at run time: a constant 32 is unrolled, then not vectorized
    for n in range(n0, n1):
        qr, sr = q[n], scale[n]
        for m in range(x.shape[0]):
            xr = x[m]
            acc = np.float32(0.0)
            for b in range(nb):
                xb, qb = xr[b * bs:b * bs + bs], qr[b * bs:b * bs + bs]
                s = np.float32(0.0)
                for j in range(bs):
                    s += xb[j] * np.float32(qb[j])
                acc += s * sr[b]
            out[m, n] = acc


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
def matmul_q8(x, q, scale, out, threads):
    """x [M, K] float32 @ (q [N, K] int8 * scale [N, K / 32] float32).T -> out [M, N] float32, all
    C-contiguous; threads: Numba's thread count (passed in, as for cpu_gemm.matmul_nt)."""
    m_n, n_rows, k = x.shape[0], q.shape[0], q.shape[1]
    if m_n <= 2:
        for t in numba.prange(threads):
            _q8_rows_in_order(x, q, scale, out, t * n_rows // threads, (t + 1) * n_rows // threads)
        return
    n_panels, n_blocks = work_items(n_rows, threads)
    for blk in numba.prange(n_blocks):
        p0 = blk * n_panels // n_blocks
        p1 = (blk + 1) * n_panels // n_blocks
        r0, r1 = p0 * PANEL_ROWS, min(p1 * PANEL_ROWS, n_rows)
        buf = np.empty((r1 - r0, k), np.float32)
        _widen_rows(q, scale, r0, r1, buf)
        sweep(x, buf, out[:, r0:r1], 0, p1 - p0)
