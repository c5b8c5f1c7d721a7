"""CpuOps against the naive float64 references in reference.py.

Inputs are fresh random draws per parameter set (seeded from the test id), never zeros.
In-place ops get poisoned or random destinations and are checked for what they must not touch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.ops import AttnMetadata
from cupaged.util import bf16_bits_to_float, float_to_bf16_bits

from tests.kernels import reference as ref

F32 = np.float32
RTOL, ATOL = 1e-5, 1e-5
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ops():
    return CpuOps()


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(F32)


# --- arrays and dense layers ----------------------------------------------------------
def test_array_helpers(ops, rng):
    x = randn(rng, 3, 4)
    assert ops.asarray(x) is x or np.shares_memory(ops.asarray(x), x)
    assert ops.asarray([1, 2], dtype=np.int32).dtype == np.int32
    assert ops.asarray(x.T).flags.c_contiguous
    assert isinstance(ops.to_numpy(x), np.ndarray)
    z = ops.zeros((2, 5), F32)
    assert z.shape == (2, 5) and z.dtype == F32 and not z.any()


def test_embedding(ops, rng):
    table = randn(rng, 50, 24)
    ids = rng.integers(0, 50, size=17).astype(np.int32)
    np.testing.assert_array_equal(ops.embedding(ids, table), table[ids])


# N, K and M that are not multiples of the 4 x 4 tile of cpu_gemm.matmul_nt.
@pytest.mark.parametrize("t,k,n", [(1, 64, 48), (3, 33, 5), (5, 100, 7), (16, 576, 1536), (37, 100, 7),
                                   (64, 128, 130), (65, 96, 64), (200, 64, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gemm", ["numba", "blas"])
def test_linear(rng, t, k, n, with_bias, gemm):
    x, w = randn(rng, t, k), randn(rng, n, k)
    b = randn(rng, n) if with_bias else None
    want = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b)
    got = CpuOps(gemm=gemm).linear(x, w, b)
    assert got.shape == (t, n) and got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def weights_as(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(w stored as dtype, the float64 values it holds): bf16 is checked against its own dequantized
    values, so only the GEMM's float32 arithmetic is under test."""
    if dtype == "float32":
        return w, w.astype(np.float64)
    bits = float_to_bf16_bits(np, w)
    return bits, bf16_bits_to_float(np, bits).astype(np.float64)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 576, 963), (1, 1536, 6), (1, 40, 5), (2, 40, 3), (4, 17, 4),
                                   (6, 300, 9), (16, 576, 963), (23, 1536, 576)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_nt(rng, m, k, n, threads, dtype):
    from cupaged.backend.cpu_gemm import matmul_nt
    x = randn(rng, m, k)
    w, w64 = weights_as(randn(rng, n, k), dtype)
    out = np.full((m, n), np.nan, F32)
    matmul_nt(x, w, out, threads)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w64.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_tiles_whatever_the_host(rng, dtype):
    # matmul_nt takes the 4 x 4 tile with AVX-512 and the 4 x 2 one without: check both here
    from cupaged.backend.cpu_gemm import _tile4x2, _tile4x4
    x = randn(rng, 4, 77)
    w, w64 = weights_as(randn(rng, 4, 77), dtype)
    for tile, cols in ((_tile4x4, 4), (_tile4x2, 2)):
        out = np.full((4, 4), np.nan, F32)
        tile(x, w, out, 0, 0)
        np.testing.assert_allclose(out[:, :cols], x.astype(np.float64) @ w64[:cols].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gemm", ["numba", "blas"])
def test_bf16_weights_through_the_ops(rng, gemm):
    ops = CpuOps(gemm=gemm, weights="bfloat16")
    w = ops.asarray(randn(rng, 130, 96), ops.weight_dtype)
    assert w.dtype == np.uint16 and ops.dtype_name == "float32, bfloat16 weights"
    w64 = bf16_bits_to_float(np, w).astype(np.float64)
    x, b = randn(rng, 5, 96), randn(rng, 130)
    np.testing.assert_allclose(ops.linear(x, w, b), x.astype(np.float64) @ w64.T + b, rtol=1e-4, atol=1e-4)
    ids = rng.integers(0, 130, size=9).astype(np.int32)
    got = ops.embedding(ids, w)
    assert got.dtype == F32 and np.array_equal(got, w64[ids].astype(F32))
    with pytest.raises(ValueError, match="weights must be one of float32, bfloat16"):
        CpuOps(weights="int4")


def test_gemm_choice_is_checked_by_name(monkeypatch):
    monkeypatch.delenv("CUPAGED_CPU_GEMM", raising=False)
    assert CpuOps().gemm == "numba"
    monkeypatch.setenv("CUPAGED_CPU_GEMM", "blas")
    assert CpuOps().gemm == "blas"
    monkeypatch.setenv("CUPAGED_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="CUPAGED_CPU_GEMM.*'mkl'"):
        CpuOps()


@pytest.mark.parametrize("gemm", ["numba", "blas"])
def test_linear_refuses_mismatched_shapes(rng, gemm):
    ops = CpuOps(gemm=gemm)
    with pytest.raises(ValueError, match=r"x \(4, 8\) does not fit weight \(6, 9\)"):
        ops.linear(randn(rng, 4, 8), randn(rng, 6, 9))
    with pytest.raises(ValueError, match="does not fit"):
        ops.linear(randn(rng, 8), randn(rng, 6, 8))


def test_silu_and_mul_refuses_an_odd_width(ops, rng):
    with pytest.raises(ValueError, match="odd width 7"):
        ops.silu_and_mul(randn(rng, 2, 7))


def test_linear_takes_strided_rows(ops, rng):
    x, w = randn(rng, 8, 40), randn(rng, 12, 40)
    np.testing.assert_allclose(ops.linear(x[::2], w), x[::2].astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_linear_does_not_copy_weight(ops, rng):
    w = randn(rng, 1024, 2048)  # 8 MiB
    x = randn(rng, 4, 2048)
    ops.linear(x, w)
    tracemalloc.start()
    ops.linear(x, w)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < w.nbytes // 8


@pytest.mark.parametrize("t,h", [(1, 64), (7, 576), (64, 1000)])
def test_rms_norm(ops, rng, t, h):
    x, w = randn(rng, t, h), randn(rng, h)
    x0 = x.copy()
    got = ops.rms_norm(x, w, 1e-5)
    np.testing.assert_allclose(got, ref.rms_norm(x, w, 1e-5), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("t,h", [(1, 64), (7, 576), (64, 1000)])
def test_fused_add_rms_norm(ops, rng, t, h):
    x, res, w = randn(rng, t, h), randn(rng, t, h), randn(rng, h)
    want, want_res = ref.fused_add_rms_norm(x, res, w, 1e-6)
    got = ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert not np.shares_memory(got, res)
    np.testing.assert_allclose(res, want_res, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("t,i", [(1, 32), (5, 1536), (64, 100)])
def test_silu_and_mul(ops, rng, t, i):
    x = randn(rng, t, 2 * i) * 4
    got = ops.silu_and_mul(x)
    assert got.shape == (t, i)
    np.testing.assert_allclose(got, ref.silu_and_mul(x), rtol=RTOL, atol=ATOL)


def test_silu_and_mul_saturates(ops):
    x = np.array([[-100.0, 100.0, 0.0, -30.0, 1.0, 2.0, 3.0, 4.0]], F32)
    np.testing.assert_allclose(ops.silu_and_mul(x), ref.silu_and_mul(x), rtol=RTOL, atol=ATOL)


def test_exp_f32_against_float64():
    import numba

    from cupaged.backend.cpu_math import exp_f32

    @numba.njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_f32(x[i])

    x = np.concatenate([np.linspace(-86, 86, 200001), [0.0, -1e-7, 1e-7, np.log(2.0)]]).astype(F32)
    got = np.empty_like(x)
    apply(x, got)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel[np.abs(x) <= 20].max() < 2e-6 and rel.max() < 6e-6
    apply(np.array([-200.0, 200.0], F32), got[:2])  # clamped to 2**-125 and 2**125, finite
    assert 0 < got[0] < 1e-37 and np.isfinite(got[1]) and got[1] > 1e37


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("d,rot", [(64, 64), (80, 80), (128, 128), (64, 32), (128, 64)])
@pytest.mark.parametrize("hq,hk", [(9, 3), (4, 4)])
def test_rotary_embedding(ops, rng, is_neox, d, rot, hq, hk):
    t = 11
    qkv = randn(rng, t, (hq + 2 * hk) * d)  # q, k are strided views into one buffer, as in a model
    q = qkv[:, :hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].reshape(t, hk, d)
    v0 = qkv[:, (hq + hk) * d:].copy()
    cache = ref.cos_sin_cache(4096, rot)
    positions = rng.integers(0, 4096, size=t).astype(np.int32)
    want_q = ref.rotary_embedding(positions, q, cache, is_neox)
    want_k = ref.rotary_embedding(positions, k, cache, is_neox)
    assert ops.rotary_embedding(positions, q, k, cache, is_neox) is None
    np.testing.assert_allclose(q, want_q, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(k, want_k, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(qkv[:, (hq + hk) * d:], v0)


# --- paged KV cache -------------------------------------------------------------------
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_write_kv_skips_padding(ops, rng, bs):
    nb, hk, d, t = 6, 3, 64, 20
    k_cache, v_cache = randn(rng, nb, bs, hk, d), randn(rng, nb, bs, hk, d)
    k, v = randn(rng, t, hk, d), randn(rng, t, hk, d)
    slots = rng.choice(nb * bs, size=t, replace=False).astype(np.int32)
    slots[rng.choice(t, size=5, replace=False)] = -1
    want_k, want_v = ref.write_kv(k, v, k_cache, v_cache, slots)
    ops.write_kv(k, v, k_cache, v_cache, slots)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)


def test_copy_blocks(ops, rng):
    k_cache, v_cache = randn(rng, 8, 16, 2, 64), randn(rng, 8, 16, 2, 64)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    pairs = np.array([[0, 5], [3, 1], [7, 2]], np.int32)
    for src, dst in pairs:
        want_k[dst], want_v[dst] = want_k[src], want_v[src]
    ops.copy_blocks(k_cache, v_cache, pairs)
    np.testing.assert_array_equal(k_cache, want_k)
    np.testing.assert_array_equal(v_cache, want_v)
    ops.copy_blocks(k_cache, v_cache, np.zeros((0, 2), np.int32))
    np.testing.assert_array_equal(k_cache, want_k)


def make_batch(rng, seqs, hq, hk, d, bs, pad=0):
    """seqs: list of (context length after this step, new tokens) -> q, caches, metadata, ks, vs.

    The K/V of every sequence (cached and new) is drawn contiguously and scattered into
    randomly permuted blocks; `pad` extra query rows follow the last sequence.
    """
    ks = [randn(rng, n, hk, d) for n, _ in seqs]
    vs = [randn(rng, n, hk, d) for n, _ in seqs]
    k_cache, v_cache, tables = ref.scatter_to_blocks(rng, ks, vs, bs)
    q_lens = [q for _, q in seqs]
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_lens = np.array([n for n, _ in seqs], np.int32)
    positions = np.concatenate([np.arange(n - q, n) for n, q in seqs] + [np.zeros(pad)]).astype(np.int32)
    meta = AttnMetadata(
        positions=positions,
        slot_mapping=np.full(len(positions), -1, np.int32),  # K/V are already in the cache
        block_tables=tables, seq_lens=seq_lens, query_start_loc=qsl,
        logits_indices=(qsl[1:] - 1).astype(np.int32),
        max_query_len=max(q_lens), max_seq_len=int(seq_lens.max()))
    q = randn(rng, int(qsl[-1]) + pad, hq, d)
    return q, k_cache, v_cache, meta, ks, vs


def check_attention(ops, q, k_cache, v_cache, meta, window=0):
    scale = 1.0 / np.sqrt(q.shape[2])
    got = ops.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window=window)
    want = ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, scale, window)
    assert got.shape == q.shape and got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def mixed_seqs(bs):
    """Decodes at 1 token, partial and exact block boundaries, a long context; full prefills;
    prefill chunks on top of cached context."""
    return [(1, 1), (bs - 3, 1), (bs, 1), (2 * bs, 2 * bs), (3 * bs + 5, 23), (bs + 1, bs + 1),
            (300, 1), (129, 40)]


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_paged_attention_mixed_batch(ops, rng, bs, group):
    hk = 2
    q, kc, vc, meta, _, _ = make_batch(rng, mixed_seqs(bs), hk * group, hk, 64, bs)
    check_attention(ops, q, kc, vc, meta)


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("hq,hk", [(9, 3), (8, 1)])
def test_paged_attention_head_dims(ops, rng, d, hq, hk):
    q, kc, vc, meta, _, _ = make_batch(rng, mixed_seqs(16), hq, hk, d, 16)
    check_attention(ops, q, kc, vc, meta)


@pytest.mark.parametrize("ctx", [1, 13, 16, 17, 32, 257, 1000])
@pytest.mark.parametrize("q_len", [1, "all"])
def test_paged_attention_context_lengths(ops, rng, ctx, q_len):
    seqs = [(ctx, ctx if q_len == "all" else q_len)]
    q, kc, vc, meta, _, _ = make_batch(rng, seqs, 9, 3, 64, 16)
    check_attention(ops, q, kc, vc, meta)


@pytest.mark.parametrize("window", [1, 5, 16, 40, 10_000])
@pytest.mark.parametrize("bs", [8, 16])
def test_paged_attention_sliding_window(ops, rng, window, bs):
    q, kc, vc, meta, _, _ = make_batch(rng, mixed_seqs(bs), 8, 2, 64, bs)
    check_attention(ops, q, kc, vc, meta, window)


def test_paged_attention_padding_rows_are_zero(ops, rng):
    q, kc, vc, meta, _, _ = make_batch(rng, [(20, 3), (5, 1)], 6, 2, 64, 8, pad=4)
    check_attention(ops, q, kc, vc, meta)
    got = ops.paged_attention(q, kc, vc, meta, 0.125)
    assert np.all(got[-4:] == 0)


def test_paged_attention_large_values_stay_finite(ops, rng):
    """Scores of a few hundred must not overflow the online softmax."""
    q, kc, vc, meta, _, _ = make_batch(rng, [(70, 70), (90, 1)], 4, 2, 64, 16)
    q *= 40
    check_attention(ops, q, kc, vc, meta)


@pytest.mark.parametrize("window", [0, 21])
@pytest.mark.parametrize("hq,hk,d", [(8, 2, 64), (9, 3, 80)])
def test_both_attention_tiles_whatever_the_host(rng, window, hq, hk, d):
    # paged_attention takes _attend_tile_rows for prefill tiles with AVX-512 and _attend_tile without:
    # check both here against the float64 reference, one 16-token tile on 50 cached + 20 new tokens
    from cupaged.backend.cpu_kernels import _attend_tile, _attend_tile_rows
    q, kc, vc, meta, _, _ = make_batch(rng, [(70, 20)], hq, hk, d, 16)
    scale = 1.0 / np.sqrt(d)
    want = ref.paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale, window)
    for tile in (_attend_tile, _attend_tile_rows):
        out = np.full(q.shape, np.nan, F32)
        for kvh in range(hk):
            tile(q, kc, vc, meta.block_tables[0], 50, 0, 16, kvh, F32(scale), window, out)
        np.testing.assert_allclose(out[:16], want[:16], rtol=RTOL, atol=ATOL)


def test_reference_paged_matches_contiguous(rng):
    """The paged reference and a dense-masked reference agree (checks the test fixture)."""
    seqs = mixed_seqs(8)
    q, kc, vc, meta, ks, vs = make_batch(rng, seqs, 6, 2, 64, 8)
    for window in (0, 7):
        paged = ref.paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens,
                                    meta.query_start_loc, 0.125, window)
        dense = ref.contiguous_attention(q, ks, vs, [n for _, n in seqs], 0.125, window)
        np.testing.assert_allclose(paged, dense, rtol=1e-12, atol=1e-12)


def test_write_kv_then_attention(ops, rng):
    """The model's order: write the new tokens' K/V by slot, then attend."""
    bs, hk, d = 16, 3, 64
    seqs = [(40, 40), (21, 1), (50, 7)]
    q, kc, vc, meta, ks, vs = make_batch(rng, seqs, 9, hk, d, bs)
    slots, new_k, new_v = [], [], []
    for b, (n, q_len) in enumerate(seqs):
        for p in range(n - q_len, n):
            slots.append(meta.block_tables[b, p // bs] * bs + p % bs)
        new_k.append(ks[b][n - q_len:])
        new_v.append(vs[b][n - q_len:])
    slots = np.array(slots, np.int32)
    kc[slots // bs, slots % bs] = np.nan  # the cache does not hold the new tokens yet
    vc[slots // bs, slots % bs] = np.nan
    ops.write_kv(np.concatenate(new_k), np.concatenate(new_v), kc, vc, slots)
    check_attention(ops, q, kc, vc, meta)


# --- compilation cache ----------------------------------------------------------------
_CACHE_PROBE = """
import json, numpy as np
from cupaged.backend import cpu_kernels as K
from cupaged.backend.cpu import CpuOps, kernels_cached
from cupaged.backend.ops import AttnMetadata
from cupaged.util import bf16_bits_to_float, float_to_bf16_bits
cached_before = kernels_cached()
i32 = lambda x: np.array(x, np.int32)
meta = AttnMetadata(i32([0, 1]), i32([0, 1]), i32([[0]]), i32([2]), i32([0, 2]), i32([1]), 2, 2)
cache = np.ones((1, 16, 1, 64), np.float32)
ops = CpuOps()
ops.paged_attention(np.ones((2, 1, 64), np.float32), cache, cache, meta, 0.125)
ops.silu_and_mul(ops.linear(np.ones((3, 8), np.float32), np.ones((6, 8), np.float32)))
from cupaged.backend.cpu_gemm import matmul_nt
from cupaged.backend.cpu_math import silu_and_mul
stats = [f.stats for f in (K.paged_attention, matmul_nt, silu_and_mul)]
print(json.dumps({"hits": [len(st.cache_hits) for st in stats], "misses": [len(st.cache_misses) for st in stats],
                  "cached_before": cached_before}))
"""


@pytest.mark.slow
def test_kernels_load_from_disk_cache_in_a_second_process(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def run():
        proc = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run()  # attention, the GEMM, SiLU
    assert min(first["misses"]) >= 1 and max(first["hits"]) == 0
    assert not first["cached_before"]  # what makes the CLI say that the first run compiles
    assert list(tmp_path.rglob("*.nbi")), "no numba index files written"
    second = run()
    assert min(second["hits"]) >= 1 and max(second["misses"]) == 0
    assert second["cached_before"]


def test_large_arrays_start_on_a_cache_line(rng):
    """The GEMM's AVX-512 loads want 64-byte aligned rows: asarray aligns arrays from 64 KiB on (a
    copy only when needed), and the ops that feed a GEMM return aligned outputs."""
    from cupaged.util import aligned_empty
    ops = CpuOps()
    raw = np.empty(300 * 64 + 4, F32)
    x = raw[1:1 + 300 * 64].reshape(300, 64)  # 4 bytes past NumPy's own (16-byte) alignment
    x[...] = randn(rng, 300, 64)
    got = ops.asarray(x, F32)
    assert got.ctypes.data % 64 == 0 and np.array_equal(got, x) and not np.shares_memory(got, x)
    assert ops.asarray(got, F32) is got
    small = x[:2]
    assert np.shares_memory(ops.asarray(small, F32), x)
    e = aligned_empty((3, 50, 700), np.uint16)
    assert e.shape == (3, 50, 700) and e.dtype == np.uint16 and e.ctypes.data % 64 == 0 and e.flags.c_contiguous
    assert aligned_empty((1, 576), F32).shape == (1, 576)  # small: plain numpy.empty (aligning costs more)
    big = ops.asarray(randn(rng, 600, 64), F32)
    w = ops.asarray(randn(rng, 70, 64), F32)
    for out in (ops.linear(big, w), ops.rms_norm(big, randn(rng, 64), 1e-6), ops.silu_and_mul(big)):
        assert out.nbytes < 64 << 10 or out.ctypes.data % 64 == 0
    assert ops.linear(big, ops.asarray(randn(rng, 128, 64), F32)).ctypes.data % 64 == 0
