"""The cases `cupaged bench kernels` times (cli/bench_kernels.py): each a `Case` whose `setup()` draws
random device inputs and returns the timed `fn(i)`, with the bytes and flops one call must move.

A case smaller than twice the L2 cache rotates through `copies_for(...)` disjoint input sets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cupaged.util import cdiv

if TYPE_CHECKING:
    from cupaged.cli.bench_kernels import Sweep


@dataclass(slots=True)
class Case:
    """One measurement: `setup()` allocates the inputs and returns the timed `fn(i)`."""

    kernel: str
    shape: str
    setup: Callable[[], Callable[[int], Any]]
    bytes: int = 0        # bytes moved per call (0: not reported)
    flops: int = 0        # floating-point operations per call (0: not reported)
    params: dict = field(default_factory=dict)


def copies_for(set_bytes: int, l2_bytes: int, limit: int = 64) -> int:
    """How many disjoint input sets keep a rotation of calls out of L2 (2x its size), at most `limit`."""
    return 1 if l2_bytes <= 0 or set_bytes <= 0 else max(1, min(limit, math.ceil(2 * l2_bytes / set_bytes)))


class Inputs:
    """Random device arrays for `ops`, drawn on the device with a fixed seed (never zeros)."""

    def __init__(self, ops, seed: int):
        self.ops, self.xp = ops, ops.xp
        self.rs = np.random.default_rng(seed) if self.xp is np else self.xp.random.RandomState(seed)
        self.host = np.random.default_rng(seed + 1)  # host-side index draws (block tables, slots)

    def normal(self, shape: tuple[int, ...], scale: float = 1.0):
        x = self.rs.standard_normal(shape, dtype=np.float32)
        if scale != 1.0:
            x *= np.float32(scale)
        return self.ops.asarray(x, self.ops.dtype)

    def int32(self, host: np.ndarray):
        return self.xp.asarray(np.ascontiguousarray(host, dtype=np.int32))


def decode_case(ops, inputs: Inputs, sw: Sweep, b: int, ctx: int, contiguous: bool, l2: int) -> Case:
    """Paged decode attention: B sequences of `ctx` tokens, one query token each. Paged: every
    sequence's blocks are drawn at random from the whole pool (a fragmented pool); contiguous: its
    blocks are consecutive in the pool (block table = identity per sequence). Same bytes either way."""
    hq, hk, d, bs = sw.q_heads, sw.kv_heads, sw.head_dim, sw.block_size
    mb = cdiv(ctx, bs)
    kv_bytes = 2 * b * ctx * hk * d * ops.itemsize
    q_bytes = b * hq * d * ops.itemsize

    def setup():
        n = copies_for(2 * b * mb * bs * hk * d * ops.itemsize, l2)
        nb = n * b * mb
        ids = np.arange(nb) if contiguous else inputs.host.permutation(nb)
        ids = ids.reshape(n, b, mb)
        k_cache, v_cache = inputs.normal((nb, bs, hk, d)), inputs.normal((nb, bs, hk, d))
        q = inputs.normal((b, hq, d))
        rows = np.arange(b)
        metas = [ops_meta(inputs, tables=ids[c], seq_lens=np.full(b, ctx), bs=bs, rows=rows) for c in range(n)]
        scale = 1.0 / math.sqrt(d)
        return lambda i: ops.paged_attention(q, k_cache, v_cache, metas[i % n], scale)

    layout = "contiguous" if contiguous else "paged"
    return Case(f"decode_{layout}", f"B={b} ctx={ctx} {hq}q/{hk}kv d={d} bs={bs}", setup, kv_bytes + q_bytes,
                4 * b * hq * ctx * d, dict(batch=b, context=ctx, q_heads=hq, kv_heads=hk, head_dim=d,
                                           block_size=bs, layout=layout))


def ops_meta(inputs: Inputs, tables: np.ndarray, seq_lens: np.ndarray, bs: int, rows: np.ndarray):
    """A decode step's AttnMetadata: sequence b's one new token is query row b, at position seq_len - 1."""
    from cupaged.backend.ops import AttnMetadata
    b = len(seq_lens)
    last = seq_lens - 1
    slots = tables[rows, last // bs] * bs + last % bs
    return AttnMetadata(positions=inputs.int32(last), slot_mapping=inputs.int32(slots),
                        block_tables=inputs.int32(tables), seq_lens=inputs.int32(seq_lens),
                        query_start_loc=inputs.int32(np.arange(b + 1)), logits_indices=inputs.int32(rows),
                        max_query_len=1, max_seq_len=int(seq_lens.max()))


def norm_cases(ops, inputs: Inputs, sw: Sweep, l2: int) -> list[Case]:
    t, h = sw.norm_shape
    row = t * h * ops.itemsize
    eps = 1e-6

    def rms():
        n = copies_for(2 * row, l2)
        xs, w = [inputs.normal((t, h)) for _ in range(n)], inputs.normal((h,))
        return lambda i: ops.rms_norm(xs[i % n], w, eps)

    def fused():
        n = copies_for(3 * row, l2)
        xs = [inputs.normal((t, h), 0.01) for _ in range(n)]
        res = [inputs.normal((t, h)) for _ in range(n)]
        w = inputs.normal((h,))
        return lambda i: ops.fused_add_rms_norm(xs[i % n], res[i % n], w, eps)

    shape = f"[{t}, {h}]"
    return [Case("rms_norm", shape, rms, 2 * row + h * ops.itemsize, params=dict(tokens=t, hidden=h)),
            Case("fused_add_rms_norm", shape, fused, 4 * row + h * ops.itemsize, params=dict(tokens=t, hidden=h))]


def gemm_case(ops, inputs: Inputs, t: int, n: int, k: int, l2: int, kernel: str = "linear") -> Case:
    size = ops.itemsize

    def setup():
        c = copies_for((t * k + n * k) * size, l2)
        xs = [inputs.normal((t, k)) for _ in range(c)]
        ws = [inputs.normal((n, k), 0.02) for _ in range(c)]
        return lambda i: ops.linear(xs[i % c], ws[i % c])

    return Case(kernel, f"[{t}, {k}] x [{n}, {k}]^T", setup, (t * k + n * k + t * n) * size, 2 * t * n * k,
                dict(tokens=t, n=n, k=k))


def silu_case(ops, inputs: Inputs, t: int, inter: int, l2: int) -> Case:
    nbytes = 3 * t * inter * ops.itemsize

    def setup():
        c = copies_for(nbytes, l2)
        xs = [inputs.normal((t, 2 * inter)) for _ in range(c)]
        return lambda i: ops.silu_and_mul(xs[i % c])

    return Case("silu_and_mul", f"[{t}, 2x{inter}]", setup, nbytes, params=dict(tokens=t, intermediate=inter))


def rotary_case(ops, inputs: Inputs, sw: Sweep, t: int, l2: int) -> Case:
    hq, hk, d = sw.q_heads, sw.kv_heads, sw.head_dim
    qk = t * (hq + hk) * d * ops.itemsize
    nbytes = 2 * qk + t * d * 4 + t * 4  # q, k read + written; a float32 cos|sin row and a position per token

    def setup():
        xp = inputs.xp
        inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
        ang = np.arange(sw.max_position)[:, None] * inv[None, :]
        cos_sin = xp.asarray(np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32))
        c = copies_for(qk, l2)
        qs = [inputs.normal((t, hq, d)) for _ in range(c)]
        ks = [inputs.normal((t, hk, d)) for _ in range(c)]
        pos = [inputs.int32(inputs.host.integers(0, sw.max_position, t)) for _ in range(c)]
        return lambda i: ops.rotary_embedding(pos[i % c], qs[i % c], ks[i % c], cos_sin, True)

    return Case("rotary_embedding", f"T={t} {hq}q/{hk}kv d={d} neox", setup, nbytes,
                params=dict(tokens=t, q_heads=hq, kv_heads=hk, head_dim=d))


def cache_case(ops, inputs: Inputs, sw: Sweep, t: int, l2: int) -> Case:
    hk, d, bs = sw.kv_heads, sw.head_dim, sw.block_size
    kv = 2 * t * hk * d * ops.itemsize
    nbytes = 2 * kv + t * 4  # k, v read, then written into their slots; one int32 slot per token

    def setup():
        c = copies_for(2 * kv, l2)
        nb = c * 2 * cdiv(t, bs)  # a pool twice the rows, so the slots are scattered
        k_cache, v_cache = inputs.normal((nb, bs, hk, d)), inputs.normal((nb, bs, hk, d))
        ks = [inputs.normal((t, hk, d)) for _ in range(c)]
        vs = [inputs.normal((t, hk, d)) for _ in range(c)]
        slots = [inputs.int32(inputs.host.choice(nb * bs, t, replace=False)) for _ in range(c)]
        return lambda i: ops.write_kv(ks[i % c], vs[i % c], k_cache, v_cache, slots[i % c])

    return Case("reshape_and_cache", f"T={t} {hk}kv d={d} bs={bs}", setup, nbytes,
                params=dict(tokens=t, kv_heads=hk, head_dim=d, block_size=bs))


def copy_case(ops, inputs: Inputs, mib: int) -> Case:
    n = mib * 2**20

    def setup():
        xp = inputs.xp
        src = xp.asarray(inputs.host.integers(0, 256, 1 << 20, dtype=np.uint8))
        src = xp.tile(src, max(1, n >> 20))[:n]
        dst = xp.empty_like(src)
        return lambda i: xp.copyto(dst, src)

    return Case("copy", f"{mib} MiB device-to-device", setup, 2 * n, params=dict(bytes=n))


def build_cases(ops, sw: Sweep, inputs: Inputs, l2: int) -> list[Case]:
    """Every case of the sweep, the reference copy first."""
    cases = [copy_case(ops, inputs, sw.copy_mib)]
    for b in sw.batches:
        for ctx in sw.contexts:
            cases += [decode_case(ops, inputs, sw, b, ctx, False, l2), decode_case(ops, inputs, sw, b, ctx, True, l2)]
    cases += norm_cases(ops, inputs, sw, l2)
    s = sw.gemm_square
    cases.append(gemm_case(ops, inputs, s, s, s, l2, kernel="linear_square"))
    cases += [gemm_case(ops, inputs, t, n, k, l2) for n, k in sw.gemm_weights for t in sw.gemm_tokens]
    cases += [silu_case(ops, inputs, t, sw.intermediate, l2) for t in sw.mlp_tokens]
    cases += [rotary_case(ops, inputs, sw, t, l2) for t in sw.rotary_tokens]
    cases += [cache_case(ops, inputs, sw, t, l2) for t in sw.cache_tokens]
    return cases


# ---- running and reporting -----------------------------------------------------------------------
