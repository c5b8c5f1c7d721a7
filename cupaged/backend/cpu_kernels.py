"""Numba kernels behind the CPU backend (`cupaged.backend.cpu.CpuOps`).

Every kernel is `njit(cache=True)`, so a second process loads machine code from the cache
directory instead of recompiling. All float math is float32 (the CPU dtype); the attention
softmax keeps its running max and sum in float32 too, which the float64 reference in
`tests/kernels/reference.py` shows to be accurate to ~1e-6.

Paged attention design. One kernel serves prefill chunks and decodes. The new tokens of
each sequence are cut into tiles of up to `ATTN_TILE` tokens; one work item is
(tile, KV head), and it computes all G = Hq // Hk query heads of that KV head for the
tile's tokens, so each K/V row is loaded once per item and reused by G * tile query rows
from L1. Keys are visited block by block through the block table with an online softmax:
per block, scores of the valid keys of one query row, one rescale of the accumulator, then
the P @ V update. A tile of 16 or more query rows (prefill) takes `_attend_tile_rows` where the
CPU has AVX-512: it holds the rows transposed, [D, rows], so the scores of 16 rows x 4 keys come
from broadcast FMAs with no sum across a vector per score (cpu_simd.scores4; 3x faster at a
512-token prefill), the softmax runs across rows and P @ V accumulates into the output rows, held
transposed too (cpu_simd.pv_rows). Fewer rows (decode) take `_attend_tile`, whose blocks with every
key visible go 16 keys at a time through cpu_simd_attn.attend16 on AVX-512 (a 16-stream q8_0 decode
step's attention 20.8 -> 13.8 ms, decode_breakdown.py --batch 16); a block's partial ends take the
Numba loop. Items are spread over threads with `prange`; since the static schedule gives each
thread a contiguous range, items are visited in a zig-zag order (0, n-1, 1, n-2, ...) so that the
causal cost ramp of a long prefill is balanced.

Shapes (see `cupaged.backend.ops`): q [T, Hq, D], caches [NB, BS, Hk, D],
block_tables [B, MB], seq_lens [B], query_start_loc [B + 1].
"""
from __future__ import annotations

import math

import numba
import numpy as np

from cupaged.backend.cpu_math import FASTMATH, exp_f32
from cupaged.backend.cpu_simd import PV_OUTS, pv_rows, scores1, scores4, wide_vectors
from cupaged.backend.cpu_simd_attn import KEYS, attend16

ATTN_TILE = 16  # new tokens per attention work item
# tiles of >= 16 query rows (prefill) take _attend_tile_rows where the CPU has AVX-512: its 16 score
# accumulators would spill AVX2's 16 registers (each <16 x float> is two of them there)
ROWS_PATH = wide_vectors()


# --- norms and activations ------------------------------------------------------------
@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _norm_row(x, weight, eps, out):
    """x [H] -> out [H] = x / rms(x) * weight."""
    h = x.shape[0]
    ss = np.float32(0.0)
    for i in range(h):
        ss += x[i] * x[i]
    inv = np.float32(1.0 / math.sqrt(ss / h + eps))
    for i in range(h):
        out[i] = x[i] * inv * weight[i]


PARALLEL_ROWS = 64  # from this many rows on, the ops take the norms that split rows across threads (the
                   # *_par twins): below, a parallel function's launch (~1 us) costs more than it saves


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def rms_norm(x, weight, eps, out):
    """x [T, H], weight [H] -> out [T, H]."""
    for t in range(x.shape[0]):
        _norm_row(x[t], weight, eps, out[t])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def rms_norm_par(x, weight, eps, out):
    """rms_norm with threads splitting T."""
    for t in numba.prange(x.shape[0]):
        _norm_row(x[t], weight, eps, out[t])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _add_norm_row(x, residual, weight, eps, out):
    for i in range(x.shape[0]):
        residual[i] += x[i]
    _norm_row(residual, weight, eps, out)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def fused_add_rms_norm(x, residual, weight, eps, out):
    """residual [T, H] += x [T, H] in place; out [T, H] = rms_norm(residual)."""
    for t in range(x.shape[0]):
        _add_norm_row(x[t], residual[t], weight, eps, out[t])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def fused_add_rms_norm_par(x, residual, weight, eps, out):
    """fused_add_rms_norm with threads splitting T."""
    for t in numba.prange(x.shape[0]):
        _add_norm_row(x[t], residual[t], weight, eps, out[t])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _rotate_heads(x, cos_sin, half, is_neox):
    """x [H, D] in place; cos_sin [rot_dim] = [cos | sin] for one position."""
    for h in range(x.shape[0]):
        for i in range(half):
            c = cos_sin[i]
            s = cos_sin[half + i]
            if is_neox:
                a, b = i, i + half
            else:
                a, b = 2 * i, 2 * i + 1
            x1 = x[h, a]
            x2 = x[h, b]
            x[h, a] = x1 * c - x2 * s
            x[h, b] = x2 * c + x1 * s


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def rotary_embedding(positions, q, k, cos_sin_cache, is_neox):
    """In place on q [T, Hq, D] and k [T, Hk, D]; cos_sin_cache [max_pos, rot_dim]."""
    half = cos_sin_cache.shape[1] // 2
    for t in range(positions.shape[0]):
        cs = cos_sin_cache[positions[t]]
        _rotate_heads(q[t], cs, half, is_neox)
        _rotate_heads(k[t], cs, half, is_neox)


# --- paged KV cache -------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, Hk, D] -> caches [NB, BS, Hk, D] at slot_mapping [T]; slot < 0 is skipped."""
    bs = k_cache.shape[1]
    for t in range(slot_mapping.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:
            continue
        k_cache[slot // bs, slot % bs] = k[t]
        v_cache[slot // bs, slot % bs] = v[t]


@numba.njit(cache=True, nogil=True)
def copy_blocks(k_cache, v_cache, pairs):
    """pairs [P, 2] of (src, dst) block ids, applied in order to both caches."""
    for p in range(pairs.shape[0]):
        k_cache[pairs[p, 1]] = k_cache[pairs[p, 0]]
        v_cache[pairs[p, 1]] = v_cache[pairs[p, 0]]


@numba.njit(cache=True, nogil=True)
def _plan_tiles(query_start_loc, tile):
    """query_start_loc [B + 1] -> tiles [N, 3] int64 rows of (seq b, first token, end token)."""
    n = 0
    for b in range(query_start_loc.shape[0] - 1):
        n += (query_start_loc[b + 1] - query_start_loc[b] + tile - 1) // tile
    tiles = np.empty((n, 3), np.int64)
    i = 0
    for b in range(query_start_loc.shape[0] - 1):
        for t0 in range(query_start_loc[b], query_start_loc[b + 1], tile):
            tiles[i, 0] = b
            tiles[i, 1] = t0
            tiles[i, 2] = min(t0 + tile, query_start_loc[b + 1])
            i += 1
    return tiles


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _attend_block(qrow, kb, vb, kvh, j0, j1, acc, ml, r, scores):
    """One query row against keys j0..j1-1 of one cache block, online-softmax update.

    qrow [D] (pre-scaled), kb/vb [BS, Hk, D], acc [R, D], ml [R, 2] = (running max, sum),
    scores [BS] float32 scratch. Scores and the P @ V update take four keys per pass, so
    each load of qrow / acc[r] serves four keys (measured ~15% faster than one key).
    """
    d_n = qrow.shape[0]
    mx = ml[r, 0]
    j = j0
    while j + 4 <= j1:
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        k0 = kb[j, kvh]
        k1 = kb[j + 1, kvh]
        k2 = kb[j + 2, kvh]
        k3 = kb[j + 3, kvh]
        for d in range(d_n):
            qd = qrow[d]
            s0 += qd * k0[d]
            s1 += qd * k1[d]
            s2 += qd * k2[d]
            s3 += qd * k3[d]
        scores[j] = s0
        scores[j + 1] = s1
        scores[j + 2] = s2
        scores[j + 3] = s3
        j += 4
    while j < j1:
        s = np.float32(0.0)
        for d in range(d_n):
            s += qrow[d] * kb[j, kvh, d]
        scores[j] = s
        j += 1
    for j in range(j0, j1):
        mx = max(mx, scores[j])
    if mx > ml[r, 0]:
        if ml[r, 1] > 0:  # rescale what earlier blocks accumulated
            alpha = exp_f32(ml[r, 0] - mx)
            ml[r, 1] *= alpha
            for d in range(d_n):
                acc[r, d] *= alpha
        ml[r, 0] = mx
    lsum = np.float32(0.0)
    for j in range(j0, j1):
        p = exp_f32(scores[j] - mx)
        scores[j] = p
        lsum += p
    a = acc[r]
    j = j0
    while j + 4 <= j1:
        p0 = scores[j]
        p1 = scores[j + 1]
        p2 = scores[j + 2]
        p3 = scores[j + 3]
        v0 = vb[j, kvh]
        v1 = vb[j + 1, kvh]
        v2 = vb[j + 2, kvh]
        v3 = vb[j + 3, kvh]
        for d in range(d_n):
            a[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]
        j += 4
    while j < j1:
        p = scores[j]
        for d in range(d_n):
            a[d] += p * vb[j, kvh, d]
        j += 1
    ml[r, 1] += lsum  # stored last: a store to ml before the P @ V loop measured ~25% slower


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _attend_tile(q, k_cache, v_cache, table, first_pos, t0, t1, kvh, scale, window, out):
    """Tokens t0..t1-1 of one sequence (first at position first_pos), all query heads of KV head kvh.

    table [MB] is the sequence's block table row; writes out[t0:t1, kvh*G:(kvh+1)*G].
    """
    d_n = q.shape[2]
    bs = k_cache.shape[1]
    g_n = q.shape[1] // k_cache.shape[2]
    rows = (t1 - t0) * g_n
    qbuf = np.empty((rows, d_n), np.float32)
    for r in range(rows):
        for d in range(d_n):
            qbuf[r, d] = q[t0 + r // g_n, kvh * g_n + r % g_n, d] * scale
    acc = np.zeros((rows, d_n), np.float32)
    ml = np.empty((rows, 2), np.float32)
    ml[:, 0] = -np.inf
    ml[:, 1] = 0.0
    scores = np.empty(bs, np.float32)
    simd = ROWS_PATH and bs % KEYS == 0 and d_n % 16 == 0  # AVX-512: attend16's 16 accumulators fit
    last_pos = first_pos + t1 - t0 - 1
    lo = max(0, first_pos - window + 1) if window > 0 else 0
    for bi in range(lo // bs, last_pos // bs + 1):
        base = bi * bs
        kb = k_cache[table[bi]]
        vb = v_cache[table[bi]]
        for r in range(rows):
            pos = first_pos + r // g_n
            j0 = max(0, pos - window + 1 - base) if window > 0 else 0
            j1 = min(bs, pos + 1 - base)
            if simd and j0 == 0 and j1 == bs:  # every key visible: 16 at a time (cpu_simd_attn)
                for w0 in range(0, bs, KEYS):
                    attend16(qbuf.ctypes.data + r * qbuf.strides[0], kb.ctypes.data + kvh * kb.strides[1]
                             + w0 * kb.strides[0], kb.strides[0], vb.ctypes.data + kvh * vb.strides[1]
                             + w0 * vb.strides[0], vb.strides[0], d_n, acc.ctypes.data + r * acc.strides[0],
                             ml.ctypes.data + r * ml.strides[0])
            elif j1 > j0:
                _attend_block(qbuf[r], kb, vb, kvh, j0, j1, acc, ml, r, scores)
    for r in range(rows):
        inv = np.float32(1.0) / ml[r, 1] if ml[r, 1] > 0 else np.float32(0.0)
        for d in range(d_n):
            out[t0 + r // g_n, kvh * g_n + r % g_n, d] = acc[r, d] * inv


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _block_scores(qT, kb, kvh, ja, jb, sc):
    """sc[j, :] = qT.T @ kb[j, kvh] for keys ja..jb-1 of a block: 16 rows x 4 keys per SIMD call."""
    k_stride, d_n = kb.strides[0], qT.shape[0]
    kp = kb.ctypes.data + kvh * kb.strides[1]
    qp, q_stride, s_stride = qT.ctypes.data, qT.strides[0], sc.strides[0]
    for c in range(0, qT.shape[1], 16):
        j = ja
        while j + 4 <= jb:
            scores4(qp + 4 * c, q_stride, kp + j * k_stride, k_stride, 4, d_n, sc.ctypes.data + j * s_stride + 4 * c,
                    s_stride, 0)
            j += 4
        for jj in range(j, jb):
            scores1(qp + 4 * c, q_stride, kp + jj * k_stride, k_stride, 4, d_n,
                    sc.ctypes.data + jj * s_stride + 4 * c, s_stride, 0)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _block_pv(sc, vb, kvh, ja, jb, alpha, accT):
    """accT[d, :] = alpha * accT[d, :] + sum over keys j in ja..jb-1 of sc[j, :] * vb[j, kvh, d]: the rows
    as vector lanes, 16 rows x PV_OUTS dims per SIMD call (cpu_simd.pv_rows)."""
    v_stride, a_stride, s_stride = vb.strides[0], accT.strides[0], sc.strides[0]
    vp = vb.ctypes.data + kvh * vb.strides[1] + ja * v_stride
    sp, ap, alp = sc.ctypes.data + ja * s_stride, accT.ctypes.data, alpha.ctypes.data
    for c in range(0, accT.shape[1], 16):
        for d in range(0, accT.shape[0], PV_OUTS):
            pv_rows(sp + 4 * c, s_stride, vp + 4 * d, 4, v_stride, jb - ja, ap + d * a_stride + 4 * c, a_stride,
                    alp + 4 * c)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _softmax_block(sc, pos, base, ja, jb, window, masked, m, l, alpha, bm):
    """Online softmax over keys ja..jb-1 (positions base + j) for every row r (at position pos[r]):
    masks what r may not see (only where `masked`: some key of the block is hidden from some row),
    updates its running max m[r] and sum l[r], sets alpha[r] (how much its accumulator shrinks) and
    turns sc[j, r] into the key's weight (0 where masked). bm [rows] is scratch for the block's max."""
    rp = sc.shape[1]
    ninf = np.float32(-np.inf)
    bm[:] = ninf
    for j in range(ja, jb):
        kpos = base + j
        srow = sc[j]
        if masked:
            for r in range(rp):
                if kpos > pos[r] or (window > 0 and kpos <= pos[r] - window):
                    srow[r] = ninf
        for r in range(rp):
            bm[r] = max(bm[r], srow[r])
    for r in range(rp):
        mn = max(m[r], bm[r])
        alpha[r] = exp_f32(m[r] - mn) if m[r] > ninf else np.float32(0.0)
        m[r] = mn
        l[r] *= alpha[r]
    for j in range(ja, jb):
        srow = sc[j]
        for r in range(rp):
            v = srow[r]
            w = exp_f32(v - m[r]) if v > ninf else np.float32(0.0)
            srow[r] = w
            l[r] += w


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _attend_tile_rows(q, k_cache, v_cache, table, first_pos, t0, t1, kvh, scale, window, out):
    """_attend_tile for tiles of >= 16 query rows (prefill): scores as 16-row x 4-key SIMD blocks against
    the rows held transposed (cpu_simd.scores4: no sum across lanes per score), the online softmax
    vectorized across rows, then P @ V into the output rows held transposed too, accT [D, rows], with the
    softmax's rescale folded in (cpu_simd.pv_rows: 16 rows x 8 dims per call)."""
    d_n, bs = q.shape[2], k_cache.shape[1]
    g_n = q.shape[1] // k_cache.shape[2]
    rows = (t1 - t0) * g_n
    rp = (rows + 15) // 16 * 16
    qT = np.zeros((d_n, rp), np.float32)  # [D, rows]; padding rows stay 0
    pos = np.full(rp, first_pos + t1 - t0 - 1, np.int64)  # padding rows: scores 0, outputs never read
    for r in range(rows):
        pos[r] = first_pos + r // g_n
        for d in range(d_n):
            qT[d, r] = q[t0 + r // g_n, kvh * g_n + r % g_n, d] * scale
    accT = np.zeros((d_n, rp), np.float32)  # the output rows transposed, as qT
    m = np.full(rp, -np.inf, np.float32)
    l = np.zeros(rp, np.float32)
    alpha, bm = np.empty(rp, np.float32), np.empty(rp, np.float32)
    sc = np.empty((bs, rp), np.float32)
    last_pos = first_pos + t1 - t0 - 1
    lo = max(0, first_pos - window + 1) if window > 0 else 0
    for bi in range(lo // bs, last_pos // bs + 1):
        base = bi * bs
        ja, jb = max(0, lo - base), min(bs, last_pos + 1 - base)
        kb, vb = k_cache[table[bi]], v_cache[table[bi]]
        _block_scores(qT, kb, kvh, ja, jb, sc)
        masked = base + jb - 1 > first_pos or (window > 0 and base + ja <= last_pos - window)
        _softmax_block(sc, pos, base, ja, jb, window, masked, m, l, alpha, bm)
        _block_pv(sc, vb, kvh, ja, jb, alpha, accT)
    for r in range(rows):
        inv = np.float32(1.0) / l[r] if l[r] > 0 else np.float32(0.0)
        for d in range(d_n):
            out[t0 + r // g_n, kvh * g_n + r % g_n, d] = accT[d, r] * inv


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window, out):
    """q [T, Hq, D] -> out [T, Hq, D] (rows past query_start_loc[-1] are zeroed).

    Causal over each sequence's cached K/V [NB, BS, Hk, D] read through block_tables [B, MB];
    window > 0 keeps only positions > pos - window.
    """
    hk = k_cache.shape[2]
    out[query_start_loc[-1]:] = 0.0
    tiles = _plan_tiles(query_start_loc, ATTN_TILE)
    n = tiles.shape[0] * hk
    for it in numba.prange(n):
        i = it // 2 if it % 2 == 0 else n - 1 - it // 2  # zig-zag: balance the causal ramp
        b, t0, t1 = tiles[i // hk, 0], tiles[i // hk, 1], tiles[i // hk, 2]
        q_len = query_start_loc[b + 1] - query_start_loc[b]
        first_pos = seq_lens[b] - q_len + (t0 - query_start_loc[b])
        if ROWS_PATH and (t1 - t0) * (q.shape[1] // hk) >= 16 and q.shape[2] % PV_OUTS == 0:
            _attend_tile_rows(q, k_cache, v_cache, block_tables[b], first_pos, t0, t1, i % hk, scale, window, out)
        else:
            _attend_tile(q, k_cache, v_cache, block_tables[b], first_pos, t0, t1, i % hk, scale, window, out)
