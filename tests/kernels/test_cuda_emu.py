"""The CUDA kernels of cuda/*.cu, run on the CPU through the host emulator (tests/emu) and, with
`pytest -m gpu` on a machine with CuPy and a device, the same grid on the GPU (`kernel_module`, conftest.py).

Each kernel and dtype is compared with a naive float64 reference (tests/kernels/reference.py
or a formula here) on fresh random inputs (never zeros). Outputs are poisoned with 0xFF
bytes (NaN in every float dtype) before launch, so an element the kernel forgets to write
fails the test. Shapes include sizes that are not a multiple of the 16-byte vector width,
so the scalar paths run too. bf16 arrays are np.uint16 bit patterns.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.kernels import reference as ref

harness = pytest.importorskip("tests.emu.harness", reason="host emulation harness (tests/emu/harness.py) not present")
to_bf16, from_bf16 = harness.to_bf16, harness.from_bf16

DTYPES = ["f16", "bf16", "f32"]
TOL = {"f16": (1e-2, 1e-2), "bf16": (2e-2, 2e-2), "f32": (1e-5, 1e-5)}  # (rtol, atol)


def to_dev(x64: np.ndarray, dt: str) -> np.ndarray:
    """float64 values -> the kernel's storage array for dtype dt."""
    if dt == "f16":
        return np.ascontiguousarray(x64, dtype=np.float16)
    if dt == "bf16":
        return np.ascontiguousarray(to_bf16(np.asarray(x64, np.float32)))
    return np.ascontiguousarray(x64, dtype=np.float32)


def from_dev(a: np.ndarray, dt: str) -> np.ndarray:
    """Storage array -> float64 values."""
    return (from_bf16(a) if dt == "bf16" else a).astype(np.float64)


def poisoned(shape, dt: str) -> np.ndarray:
    """An output array filled with 0xFF bytes: NaN in fp16, bf16 and fp32."""
    np_dt = {"f16": np.float16, "bf16": np.uint16, "f32": np.float32}[dt]
    a = np.empty(shape, np_dt)
    a.view(np.uint8)[...] = 0xFF
    return a


def assert_close(got: np.ndarray, want: np.ndarray, dt: str):
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} elements unwritten or non-finite"
    rtol, atol = TOL[dt]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def rand(rng, *shape, lo=0.1):
    """Random values with |x| >= lo and random signs: never zero."""
    return rng.uniform(lo, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


# --- layernorm.cu -------------------------------------------------------------------------
NORM_SHAPES = [(1, 8), (3, 13), (5, 64), (2, 100), (4, 4096), (2, 9000), (3, 8195)]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T,H", NORM_SHAPES)
def test_rms_norm(kernel_module, rng, dt, T, H):
    mod = kernel_module("cuda/layernorm.cu", asan=False)
    x, w = to_dev(rand(rng, T, H), dt), to_dev(rand(rng, H), dt)
    out = poisoned((T, H), dt)
    eps = 1e-5
    mod.launch(f"rms_norm_{dt}", grid=(T,), block=(256,), args=[out, x, w, np.float32(eps), np.int32(H)],
               shared_mem=0)
    assert_close(from_dev(out, dt), ref.rms_norm(from_dev(x, dt), from_dev(w, dt), eps), dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T,H", NORM_SHAPES)
@pytest.mark.parametrize("block", [64, 256])
def test_fused_add_rms_norm(kernel_module, rng, dt, T, H, block):
    mod = kernel_module("cuda/layernorm.cu", asan=False)
    x, res, w = to_dev(rand(rng, T, H), dt), to_dev(rand(rng, T, H), dt), to_dev(rand(rng, H), dt)
    res_in = from_dev(res, dt)
    out = poisoned((T, H), dt)
    eps = 1e-6
    mod.launch(f"fused_add_rms_norm_{dt}", grid=(T,), block=(block,),
               args=[out, res, x, w, np.float32(eps), np.int32(H)], shared_mem=0)
    summed = from_dev(x, dt) + res_in
    assert_close(from_dev(res, dt), summed, dt)
    # the norm sees the sum as stored (rounded to the dtype), as a separate add would
    assert_close(from_dev(out, dt), ref.rms_norm(from_dev(res, dt), from_dev(w, dt), eps), dt)


# --- activation.cu ------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 8), (3, 7), (2, 36), (4, 1000), (2, 3001)])
def test_silu_and_mul(kernel_module, rng, dt, T, I):
    mod = kernel_module("cuda/activation.cu", asan=False)
    x = to_dev(rand(rng, T, 2 * I), dt)
    out = poisoned((T, I), dt)
    mod.launch(f"silu_and_mul_{dt}", grid=(T, 2), block=(128,), args=[out, x, np.int32(I)], shared_mem=0)
    assert_close(from_dev(out, dt), ref.silu_and_mul(from_dev(x, dt)), dt)


# --- rotary.cu ----------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("T,Hq,Hk,D,rot,pad", [(1, 2, 1, 8, 8, 0), (5, 4, 2, 64, 64, 0),
                                               (3, 6, 2, 80, 32, 0), (4, 3, 3, 16, 10, 5),
                                               (2, 8, 1, 128, 128, 16)])
def test_rotary(kernel_module, rng, dt, is_neox, T, Hq, Hk, D, rot, pad):
    """pad > 0 puts q in a wider buffer (q_stride > Hq * D), as a view into fused qkv would."""
    mod = kernel_module("cuda/rotary.cu", asan=False)
    max_pos = 64
    cs = ref.cos_sin_cache(max_pos, rot)
    positions = rng.integers(0, max_pos, T).astype(np.int32)
    qbuf = to_dev(rand(rng, T, Hq * D + pad), dt)
    k = to_dev(rand(rng, T, Hk, D), dt)
    q0 = from_dev(qbuf, dt)[:, :Hq * D].reshape(T, Hq, D)
    tail0 = from_dev(qbuf, dt)[:, Hq * D:]
    k0 = from_dev(k, dt)
    mod.launch(f"rotary_embedding_{dt}", grid=(T,), block=(64,),
               args=[positions, qbuf, k, cs, np.int32(Hq * D + pad), np.int32(Hk * D), np.int32(Hq),
                     np.int32(Hk), np.int32(D), np.int32(rot), np.int32(int(is_neox))], shared_mem=0)
    qn = from_dev(qbuf, dt)
    assert_close(qn[:, :Hq * D].reshape(T, Hq, D), ref.rotary_embedding(positions, q0, cs, is_neox), dt)
    assert_close(from_dev(k, dt), ref.rotary_embedding(positions, k0, cs, is_neox), dt)
    assert np.array_equal(qn[:, Hq * D:], tail0), "padding past the q heads was touched"


def test_rotary_matches_cpu_backend(kernel_module, rng):
    """fp32 kernel against CpuOps.rotary_embedding (the backend's reference semantics)."""
    from cupaged.backend.cpu import CpuOps

    mod = kernel_module("cuda/rotary.cu", asan=False)
    T, Hq, Hk, D, rot = 4, 4, 2, 32, 24
    cs = ref.cos_sin_cache(128, rot)
    positions = rng.integers(0, 128, T).astype(np.int32)
    for is_neox in (True, False):
        q, k = rand(rng, T, Hq, D).astype(np.float32), rand(rng, T, Hk, D).astype(np.float32)
        qc, kc = q.copy(), k.copy()
        CpuOps().rotary_embedding(positions, qc, kc, cs, is_neox)
        mod.launch("rotary_embedding_f32", grid=(T,), block=(32,),
                   args=[positions, q, k, cs, np.int32(Hq * D), np.int32(Hk * D), np.int32(Hq), np.int32(Hk),
                         np.int32(D), np.int32(rot), np.int32(int(is_neox))], shared_mem=0)
        np.testing.assert_allclose(q, qc, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(k, kc, rtol=1e-5, atol=1e-5)


# --- kv_cache.cu --------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T,Hk,D,BS,NB", [(1, 1, 8, 4, 2), (7, 2, 64, 16, 3), (5, 3, 5, 8, 4), (9, 4, 128, 16, 2)])
def test_reshape_and_cache(kernel_module, rng, dt, T, Hk, D, BS, NB):
    mod = kernel_module("cuda/kv_cache.cu", asan=False)
    k, v = to_dev(rand(rng, T, Hk, D), dt), to_dev(rand(rng, T, Hk, D), dt)
    kc, vc = to_dev(rand(rng, NB, BS, Hk, D), dt), to_dev(rand(rng, NB, BS, Hk, D), dt)
    slots = rng.permutation(NB * BS)[:T].astype(np.int32)
    slots[rng.random(T) < 0.3] = -1  # padding tokens
    want_k, want_v = ref.write_kv(from_dev(k, dt), from_dev(v, dt), from_dev(kc, dt), from_dev(vc, dt), slots)
    mod.launch(f"reshape_and_cache_{dt}", grid=(T,), block=(128,),
               args=[kc, vc, k, v, slots, np.int32(Hk * D), np.int32(Hk * D), np.int32(Hk * D)], shared_mem=0)
    assert np.array_equal(from_dev(kc, dt), want_k)  # a copy: exact, and untouched slots unchanged
    assert np.array_equal(from_dev(vc, dt), want_v)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("BS,Hk,D", [(4, 1, 8), (16, 2, 64), (3, 3, 5)])
def test_copy_blocks(kernel_module, rng, dt, BS, Hk, D):
    mod = kernel_module("cuda/kv_cache.cu", asan=False)
    NB = 8
    kc, vc = to_dev(rand(rng, NB, BS, Hk, D), dt), to_dev(rand(rng, NB, BS, Hk, D), dt)
    perm = rng.permutation(NB)
    pairs = np.stack([perm[:3], perm[3:6]], axis=1).astype(np.int32)  # dst never a src
    want_k, want_v = from_dev(kc, dt).copy(), from_dev(vc, dt).copy()
    for s, d in pairs:
        want_k[d], want_v[d] = want_k[s], want_v[s]
    mod.launch(f"copy_blocks_{dt}", grid=(len(pairs), 2), block=(256,),
               args=[kc, vc, pairs, np.int32(BS * Hk * D)], shared_mem=0)
    assert np.array_equal(from_dev(kc, dt), want_k)
    assert np.array_equal(from_dev(vc, dt), want_v)


# --- sampling.cu --------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 1), (3, 7), (4, 1000), (2, 5003)])
def test_argmax(kernel_module, rng, dt, B, V):
    mod = kernel_module("cuda/sampling.cu", asan=False)
    logits = to_dev(rand(rng, B, V) * 4, dt)
    vals = from_dev(logits, dt)
    if V > 3:  # a tie at the maximum (lowest index wins) and a NaN (ignored)
        top = vals[0].max() + 1.0
        vals[0, [V - 1, 2]] = top
        vals[B - 1, 0] = np.nan
        logits = to_dev(vals, dt)
        vals = from_dev(logits, dt)
    out = np.full(B, -7, np.int32)
    mod.launch(f"argmax_{dt}", grid=(B,), block=(128,), args=[out, logits, np.int32(V)], shared_mem=0)
    want = np.argmax(np.where(np.isnan(vals), -np.inf, vals), axis=1)
    assert out.tolist() == want.tolist()


def allowed_set(l: np.ndarray, k: int, p: float) -> np.ndarray:
    """Boolean mask of the top-k then top-p set of float64 logits (ties at a threshold kept)."""
    keep = np.ones(l.shape, bool)
    if 0 < k < len(l):
        keep &= l >= np.sort(l)[::-1][k - 1]
    if p < 1.0:
        w = np.where(keep, np.exp(l - l.max()), 0.0)
        order = np.argsort(-l, kind="stable")
        cum = np.cumsum(w[order])
        cut = np.searchsorted(cum, p * cum[-1])  # first index with cum >= p * Z
        keep &= l >= l[order[min(cut, len(l) - 1)]]
    return keep


@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize("V", [50, 777, 4099])
def test_sample_top_k_top_p(kernel_module, rng, dt, V):
    """Each row's u is placed mid-interval of a chosen allowed token, so the expected index is
    unambiguous; greedy rows (temperature 0) and top_k = 1 rows must give the argmax."""
    mod = kernel_module("cuda/sampling.cu", asan=False)
    B = 12
    logits = to_dev(rng.normal(0.0, 3.0, (B, V)), dt)
    vals = from_dev(logits, dt)
    temp = rng.uniform(0.5, 1.5, B).astype(np.float32)
    top_k = rng.integers(0, V + 5, B).astype(np.int32)
    top_p = rng.uniform(0.3, 1.2, B).astype(np.float32)
    temp[0], top_k[1], top_k[2], top_p[2] = 0.0, 1, 0, 1.0
    uniform = np.zeros(B, np.float32)
    want = np.zeros(B, np.int64)
    for b in range(B):
        l = vals[b] / temp[b] if temp[b] > 0 else vals[b]
        if temp[b] > 0 and top_p[b] < 1.0:  # put p * Z mid-step, away from rounding ties
            w = np.sort(np.where(allowed_set(l, int(top_k[b]), 1.0), np.exp(l - l.max()), 0.0))[::-1]
            cum = np.cumsum(w)
            n = int(np.count_nonzero(w))
            if n > 1:
                c = int(rng.integers(0, n - 1))
                top_p[b] = (cum[c] + cum[c + 1]) / 2 / cum[-1]
        keep = allowed_set(l, int(top_k[b]), float(top_p[b])) if temp[b] > 0 else l == l.max()
        w = np.where(keep, np.exp(l - l.max()), 0.0)
        cum = np.cumsum(w)
        choices = np.flatnonzero(w > 1e-3 * cum[-1])
        j = int(rng.choice(choices))
        uniform[b] = (cum[j] - w[j] / 2) / cum[-1]
        want[b] = j if temp[b] > 0 else int(np.argmax(vals[b]))
    out = np.full(B, -7, np.int32)
    mod.launch(f"sample_top_k_top_p_{dt}", grid=(B,), block=(256,),
               args=[out, logits, temp, top_k, top_p, uniform, np.int32(V)], shared_mem=0)
    assert out.tolist() == want.tolist()


# --- every kernel once more, under AddressSanitizer ------------------------------------------
class AsanLoader:
    """Loads the emulator's ASan build, so each launch runs in a sanitized subprocess."""

    def __call__(self, path, asan: bool = True, defines: dict | None = None):
        from tests.emu.harness import load_module
        return load_module(path, asan=True, defines=defines)


ASAN_CASES = {
    "rms_norm": lambda load, rng: test_rms_norm(load, rng, "bf16", 3, 8195),
    "fused_add_rms_norm": lambda load, rng: test_fused_add_rms_norm(load, rng, "f16", 2, 100, 64),
    "silu_and_mul": lambda load, rng: test_silu_and_mul(load, rng, "f16", 3, 7),
    "rotary": lambda load, rng: test_rotary(load, rng, "bf16", False, 5, 4, 2, 64, 64, 0),
    "reshape_and_cache": lambda load, rng: test_reshape_and_cache(load, rng, "f16", 5, 3, 5, 8, 4),
    "copy_blocks": lambda load, rng: test_copy_blocks(load, rng, "bf16", 3, 3, 5),
    "argmax": lambda load, rng: test_argmax(load, rng, "f16", 3, 7),
    "sample_top_k_top_p": lambda load, rng: test_sample_top_k_top_p(load, rng, "f16", 777),
}


@pytest.mark.parametrize("case", sorted(ASAN_CASES))
def test_under_asan(case, rng):
    """Odd sizes that take the scalar tails, where an off-by-one would read past a buffer."""
    ASAN_CASES[case](AsanLoader(), rng)
