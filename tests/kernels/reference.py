"""Naive float64 NumPy references for the backend ops, plus the paged-cache test fixture.

Deliberately slow and literal: loops where a loop says what the op means. Every function
takes and returns NumPy arrays and never mutates its inputs.
"""
from __future__ import annotations

import numpy as np

F64 = np.float64


def rms_norm(x, weight, eps):
    """x [T, H], weight [H] -> [T, H] float64."""
    x = x.astype(F64)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x / rms * weight.astype(F64)


def fused_add_rms_norm(x, residual, weight, eps):
    """-> (normed [T, H], new residual [T, H]), both float64."""
    res = residual.astype(F64) + x.astype(F64)
    return rms_norm(res, weight, eps), res


def silu_and_mul(x):
    """x [T, 2I] -> [T, I] float64."""
    x = x.astype(F64)
    n = x.shape[1] // 2
    gate, up = x[:, :n], x[:, n:]
    return gate / (1.0 + np.exp(-gate)) * up


def rotary_embedding(positions, x, cos_sin_cache, is_neox):
    """x [T, H, D] -> rotated copy, float64. Only the first rot_dim features rotate."""
    out = x.astype(F64).copy()
    rot = cos_sin_cache.shape[1]
    half = rot // 2
    for t, p in enumerate(positions):
        cos = cos_sin_cache[p, :half].astype(F64)
        sin = cos_sin_cache[p, half:].astype(F64)
        for i in range(half):
            a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
            x1, x2 = x[t, :, a].astype(F64), x[t, :, b].astype(F64)
            out[t, :, a] = x1 * cos[i] - x2 * sin[i]
            out[t, :, b] = x2 * cos[i] + x1 * sin[i]
    return out


def cos_sin_cache(max_pos, rot_dim, base=10000.0):
    """[max_pos, rot_dim] float32 = [cos | sin] of the standard rotary frequencies."""
    inv_freq = 1.0 / base ** (np.arange(0, rot_dim, 2, dtype=F64) / rot_dim)
    angles = np.outer(np.arange(max_pos, dtype=F64), inv_freq)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """-> (k_cache, v_cache) copies with each k[t], v[t] written at slot_mapping[t] >= 0."""
    kc, vc = k_cache.copy(), v_cache.copy()
    bs = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping):
        if slot >= 0:
            kc[slot // bs, slot % bs] = k[t]
            vc[slot // bs, slot % bs] = v[t]
    return kc, vc


def scatter_to_blocks(rng, ks, vs, block_size, spare_blocks=3):
    """Contiguous per-sequence K/V lists (each [L_b, Hk, D]) -> paged caches and block table.

    Blocks are drawn from a random permutation of the pool. Every slot that holds no token
    (the tail of a last block, spare blocks) is NaN, so a kernel that reads past a sequence's
    end poisons its output. Unused block-table entries are -1.
    Returns k_cache, v_cache [NB, BS, Hk, D] float32 and block_tables [B, MB] int32.
    """
    hk, d = ks[0].shape[1:]
    need = [-(-len(k) // block_size) for k in ks]
    nb = sum(need) + spare_blocks
    perm = rng.permutation(nb)
    k_cache = np.full((nb, block_size, hk, d), np.nan, np.float32)
    v_cache = np.full((nb, block_size, hk, d), np.nan, np.float32)
    tables = np.full((len(ks), max(need) + 1), -1, np.int32)
    used = 0
    for b, (k, v) in enumerate(zip(ks, vs)):
        for i in range(need[b]):
            blk = perm[used]
            used += 1
            tables[b, i] = blk
            chunk = slice(i * block_size, min((i + 1) * block_size, len(k)))
            n = chunk.stop - chunk.start
            k_cache[blk, :n] = k[chunk]
            v_cache[blk, :n] = v[chunk]
    return k_cache, v_cache, tables


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window=0):
    """q [T, Hq, D] -> [T, Hq, D] float64. Each sequence's K/V is gathered position by
    position through its block table; tokens past query_start_loc[-1] stay zero."""
    t_n, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    out = np.zeros((t_n, hq, d), F64)
    for b in range(len(seq_lens)):
        k_seq = np.zeros((seq_lens[b], hk, d), F64)
        v_seq = np.zeros((seq_lens[b], hk, d), F64)
        for p in range(seq_lens[b]):
            blk = block_tables[b, p // bs]
            k_seq[p] = k_cache[blk, p % bs]
            v_seq[p] = v_cache[blk, p % bs]
        start, end = query_start_loc[b], query_start_loc[b + 1]
        for t in range(start, end):
            pos = seq_lens[b] - (end - start) + (t - start)
            lo = max(0, pos - window + 1) if window > 0 else 0
            for h in range(hq):
                keys, values = k_seq[lo:pos + 1, h // group], v_seq[lo:pos + 1, h // group]
                scores = keys @ q[t, h].astype(F64) * scale
                w = np.exp(scores - scores.max())
                out[t, h] = w @ values / w.sum()
    return out


def contiguous_attention(q, ks, vs, q_lens, scale, window=0):
    """The same attention from contiguous per-sequence K/V (a cross-check of the paged path)."""
    outs = []
    start = 0
    for k, v, n in zip(ks, vs, q_lens):
        qb = q[start:start + n].astype(F64)
        group = qb.shape[1] // k.shape[1]
        kk = np.repeat(k.astype(F64), group, axis=1)
        vv = np.repeat(v.astype(F64), group, axis=1)
        s = np.einsum("thd,phd->htp", qb, kk) * scale
        pos = np.arange(len(k) - n, len(k))[:, None]
        keys = np.arange(len(k))[None, :]
        mask = (keys <= pos) & ((window <= 0) | (keys > pos - window))
        s = np.where(mask[None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        outs.append(np.einsum("htp,phd->thd", w, vv))
        start += n
    return np.concatenate(outs, axis=0)
