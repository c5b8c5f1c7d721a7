"""CudaOps in emulation (tests/emu/device.py: NumPy arrays, the cuda/*.cu kernels through the host
emulator, NumPy for cuBLAS) against CpuOps, op by op in fp16 and bf16, then a whole tiny Llama
through the engine.

Inputs are fresh random values (never zeros). Each op gets the same *stored* values on both
backends (the CPU reference runs on the fp16/bf16-rounded inputs in float32), so the tolerance
only covers the rounding of the CUDA op's own output and its fp32 arithmetic order. The decode
tests use 64-key partitions, so contexts over 64 take the split path (partials + merge).
With `pytest -m gpu` on a machine with CuPy and a device, the same tests run on `CupyDevice`
(NVRTC + cuBLAS); they are skipped elsewhere.
"""
from __future__ import annotations

import dataclasses

import json
import re
import shutil
import zlib

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cuda import CudaOps, heads_per_block
from cupaged.backend.kernels import launch
from cupaged.backend.ops import AttnMetadata
from tests.kernels import reference as ref

pytest.importorskip("tests.emu.harness")
from tests.emu.device import EmuDevice  # noqa: E402

PARTITION = 64
TOL = {"float16": dict(rtol=1e-2, atol=1e-2), "bfloat16": dict(rtol=2e-2, atol=2e-2)}
CPU = CpuOps()


DEVICES = ["emu", pytest.param("gpu", marks=pytest.mark.gpu)]


def make_device(kind: str):
    """The emulation device, or (with `pytest -m gpu`, skipped without CuPy and a GPU) the real one."""
    if kind == "emu":
        return EmuDevice()
    from tests.emu.gpu import gpu_skip_reason
    if (why := gpu_skip_reason()) is not None:
        pytest.skip(f"gpu: {why}")
    from cupaged.backend.cupy_device import CupyDevice
    return CupyDevice()


def launched(ops) -> list[str] | None:
    """Kernel names launched so far (the emulation device records them; None on a GPU)."""
    return getattr(ops.device, "launches", None)


@pytest.fixture(params=DEVICES)
def device_kind(request) -> str:
    return request.param


@pytest.fixture(params=["float16", "bfloat16"])
def ops(request, device_kind) -> CudaOps:
    return CudaOps(make_device(device_kind), dtype=request.param, partition_size=PARTITION)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rand(rng, *shape, lo=0.1, hi=2.0):
    """Random values with |x| in [lo, hi) and random signs: never zero."""
    return (rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def put(ops, x):
    """float32 host values -> (CudaOps device array, the float32 values it stores)."""
    a = ops.asarray(np.asarray(x, np.float32), ops.dtype)
    return a, back(ops, a)


def back(ops, a) -> np.ndarray:
    return np.asarray(ops.to_numpy(a), dtype=np.float32)


def close(ops, got, want):
    got = back(ops, got)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} non-finite outputs"
    np.testing.assert_allclose(got, want, **TOL[ops.bf16 and "bfloat16" or "float16"])


# --- arrays ---------------------------------------------------------------------------------
def test_arrays_and_dtypes(ops, rng):
    x = rand(rng, 3, 5)
    a, stored = put(ops, x)
    assert a.dtype == (np.uint16 if ops.bf16 else np.float16) and a.flags.c_contiguous
    np.testing.assert_allclose(stored, x, rtol=8e-3 if ops.bf16 else 1e-3)
    z = ops.zeros((2, 4), ops.dtype)
    assert z.dtype == a.dtype and not back(ops, z).any()
    assert ops.asarray([1, 2], np.int32).dtype == np.int32
    assert back(ops, ops.asarray(np.float32([1.0, -2.5, 3.0]), ops.dtype)).tolist() == [1.0, -2.5, 3.0]


def test_checks_refuse_wrong_arrays_and_scalars(ops, rng):
    x, _ = put(ops, rand(rng, 4, 64))
    w, _ = put(ops, rand(rng, 64))
    with pytest.raises(TypeError, match="dtype"):
        ops.rms_norm(x.astype(np.float32), w, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        ops.rms_norm(ops.xp.asfortranarray(ops.xp.ones((4, 64), x.dtype)), w, 1e-6)
    with pytest.raises(ValueError, match="shape"):
        ops.rms_norm(x, w[:32].copy(), 1e-6)
    k = ops.device.kernel("layernorm.cu", f"rms_norm_{ops.sfx}")
    out = ops.xp.empty_like(x)
    with pytest.raises(TypeError, match="np.int32"):
        launch(k, grid=(4,), block=(256,), args=[out, x, w, np.float32(1e-6), 64], shared_mem=0)
    with pytest.raises(ValueError, match="1024"):
        launch(k, grid=(4,), block=(2048,), args=[out, x, w, np.float32(1e-6), np.int32(64)], shared_mem=0)
    with pytest.raises(ValueError, match="shared memory"):
        launch(k, grid=(4,), block=(256,), args=[out, x, w, np.float32(1e-6), np.int32(64)], shared_mem=1 << 20)


# --- dense layers ---------------------------------------------------------------------------
def test_embedding(ops, rng):
    table, t32 = put(ops, rand(rng, 50, 64))
    ids = rng.integers(0, 50, 7).astype(np.int32)
    got = ops.embedding(ops.asarray(ids), table)
    np.testing.assert_array_equal(back(ops, got), CPU.embedding(ids, t32))


@pytest.mark.parametrize("t,k,n,bias", [(5, 64, 48, False), (3, 96, 40, True), (0, 64, 32, True)])
def test_linear(ops, rng, t, k, n, bias):
    x, x32 = put(ops, rand(rng, t, k))
    w, w32 = put(ops, rand(rng, n, k) / np.sqrt(k))
    b, b32 = put(ops, rand(rng, n)) if bias else (None, None)
    got = ops.linear(x, w, b)
    assert got.shape == (t, n)
    close(ops, got, CPU.linear(x32, w32, b32))


@pytest.mark.parametrize("h", [64, 50])  # 50: rows are not whole 16-byte vectors (the scalar path)
def test_rms_norm_and_fused_add(ops, rng, h):
    x, x32 = put(ops, rand(rng, 6, h))
    w, w32 = put(ops, rand(rng, h))
    close(ops, ops.rms_norm(x, w, 1e-6), CPU.rms_norm(x32, w32, 1e-6))
    res, res32 = put(ops, rand(rng, 6, h))
    want = CPU.fused_add_rms_norm(x32, res32, w32, 1e-6)  # res32 += x32 in place
    got = ops.fused_add_rms_norm(x, res, w, 1e-6)
    close(ops, res, res32)
    close(ops, got, want)


@pytest.mark.parametrize("is_neox,rot", [(True, 64), (False, 64), (True, 32)])
def test_rotary(ops, rng, is_neox, rot):
    t, hq, hk, d = 5, 4, 2, 64
    q, q32 = put(ops, rand(rng, t, hq, d))
    k, k32 = put(ops, rand(rng, t, hk, d))
    cs = ref.cos_sin_cache(100, rot).astype(np.float32)
    pos = rng.integers(0, 100, t).astype(np.int32)
    ops.rotary_embedding(ops.asarray(pos), q, k, ops.asarray(cs, np.float32), is_neox)
    CPU.rotary_embedding(pos, q32, k32, cs, is_neox)
    close(ops, q, q32)
    close(ops, k, k32)


@pytest.mark.parametrize("i", [64, 44])
def test_silu_and_mul(ops, rng, i):
    x, x32 = put(ops, rand(rng, 4, 2 * i))
    close(ops, ops.silu_and_mul(x), CPU.silu_and_mul(x32))


# --- KV cache -------------------------------------------------------------------------------
def test_write_kv_skips_padding_slots(ops, rng):
    nb, bs, hk, d, t = 6, 8, 2, 64, 7
    kc, kc32 = put(ops, rand(rng, nb, bs, hk, d))
    vc, vc32 = put(ops, rand(rng, nb, bs, hk, d))
    k, k32 = put(ops, rand(rng, t, hk, d))
    v, v32 = put(ops, rand(rng, t, hk, d))
    slots = rng.choice(nb * bs, t, replace=False).astype(np.int32)
    slots[[1, 4]] = -1
    ops.write_kv(k, v, kc, vc, ops.asarray(slots))
    CPU.write_kv(k32, v32, kc32, vc32, slots)
    np.testing.assert_array_equal(back(ops, kc), kc32)  # a copy: bit exact
    np.testing.assert_array_equal(back(ops, vc), vc32)


def test_copy_blocks(ops, rng):
    nb, bs, hk, d = 8, 16, 2, 64
    kc, kc32 = put(ops, rand(rng, nb, bs, hk, d))
    vc, vc32 = put(ops, rand(rng, nb, bs, hk, d))
    pairs = np.array([[0, 5], [3, 6], [2, 7]], np.int32)
    ops.copy_blocks(kc, vc, ops.asarray(pairs))
    CPU.copy_blocks(kc32, vc32, pairs)
    np.testing.assert_array_equal(back(ops, kc), kc32)
    np.testing.assert_array_equal(back(ops, vc), vc32)


# --- paged attention ------------------------------------------------------------------------
def attention_case(ops, rng, q_lens, seq_lens, hq, hk, d, bs, pad=0):
    """A paged batch (K/V in permuted blocks, NaN in every slot that holds no token) on both backends."""
    ks = [rand(rng, n, hk, d) for n in seq_lens]
    vs = [rand(rng, n, hk, d) for n in seq_lens]
    kc, vc, tables = ref.scatter_to_blocks(rng, ks, vs, bs)
    kc_dev, kc32 = put(ops, kc)
    vc_dev, vc32 = put(ops, vc)
    q_dev, q32 = put(ops, rand(rng, sum(q_lens) + pad, hq, d))
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    lens = np.asarray(seq_lens, np.int32)
    pos = np.concatenate([np.arange(n - q, n) for q, n in zip(q_lens, seq_lens)]).astype(np.int32)

    def meta(to):
        return AttnMetadata(positions=to(pos), slot_mapping=to(np.zeros(len(pos), np.int32)),
                            block_tables=to(tables), seq_lens=to(lens), query_start_loc=to(qsl),
                            logits_indices=to(qsl[1:] - 1), max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return (q_dev, kc_dev, vc_dev, meta(ops.asarray)), (q32, kc32, vc32, meta(np.asarray))


ATTENTION_CASES = {
    # name: (q_lens, seq_lens, hq, hk, d, bs, window, kernels launched)
    "decode-single-pass": ([1, 1, 1], [1, 17, 64], 4, 2, 64, 16, 0, ["paged_decode"]),
    "decode-split": ([1, 1, 1], [5, 65, 150], 8, 2, 128, 16, 0, ["paged_decode", "paged_decode_reduce"]),
    "decode-window": ([1, 1], [40, 150], 4, 1, 64, 8, 70, ["paged_decode", "paged_decode_reduce"]),
    "prefill": ([9, 20], [9, 20], 4, 2, 64, 16, 0, ["paged_prefill"]),
    "mixed": ([1, 12, 1], [70, 30, 3], 6, 2, 64, 8, 0, ["paged_prefill"]),
    "prefill-window": ([12, 1], [30, 45], 4, 1, 64, 16, 10, ["paged_prefill"]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_paged_attention(ops, rng, case):
    q_lens, seq_lens, hq, hk, d, bs, window, kernels = ATTENTION_CASES[case]
    (q, kc, vc, meta), (q32, kc32, vc32, meta32) = attention_case(ops, rng, q_lens, seq_lens, hq, hk, d, bs, pad=2)
    scale = d ** -0.5
    got = ops.paged_attention(q, kc, vc, meta, scale, window)
    want = CPU.paged_attention(q32, kc32, vc32, meta32, scale, window)
    assert got.shape == q.shape and got.dtype == ops.storage
    close(ops, got, want)
    assert not back(ops, got)[sum(q_lens):].any(), "padding rows must be zero"
    if launched(ops) is not None:
        assert [re.sub(r"_b?f16(_d\d+)?(_g\d+)?$", "", n) for n in launched(ops)] == kernels
        if kernels[0] == "paged_decode":
            assert launched(ops)[0].endswith(f"_d{d}_g{heads_per_block(hq // hk)}")


def test_decode_split_matches_single_pass(rng):
    """One decode batch with 64-key partitions (split + merge) and with 512 (single pass)."""
    device = EmuDevice()
    split, single = CudaOps(device, "float16", 64), CudaOps(device, "float16", 512)
    (q, kc, vc, meta), _ = attention_case(split, rng, [1, 1], [70, 200], 4, 2, 64, 16)
    a = split.paged_attention(q, kc, vc, meta, 0.125, 0)
    assert device.launches[-1].startswith("paged_decode_reduce")
    b = single.paged_attention(q, kc, vc, meta, 0.125, 0)
    assert not device.launches[-1].startswith("paged_decode_reduce")
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=2e-3)


def test_one_attention_plan_per_step(rng):
    """The layers of one step share a plan (metadata checked once, one decode scratch); each layer
    still reads only its own cache, and a new step's metadata makes a new plan, checked again."""
    ops = CudaOps(EmuDevice(), "float16", 64)
    (q, kc, vc, meta), (q32, kc32, vc32, meta32) = attention_case(ops, rng, [1, 1], [70, 130], 4, 2, 64, 16)
    (_, kc2, vc2, _), (_, kc2_32, vc2_32, _) = attention_case(ops, rng, [1, 1], [70, 130], 4, 2, 64, 16)
    layer1 = back(ops, ops.paged_attention(q, kc, vc, meta, 0.125, 0))
    plan = ops._attn_plan
    layer2 = back(ops, ops.paged_attention(q, kc2, vc2, meta, 0.125, 0))
    assert ops._attn_plan is plan and len(plan.scratch) == 1
    np.testing.assert_allclose(layer1, CPU.paged_attention(q32, kc32, vc32, meta32, 0.125), rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(layer2, CPU.paged_attention(q32, kc2_32, vc2_32, meta32, 0.125), rtol=1e-2, atol=2e-3)
    bad = dataclasses.replace(meta, seq_lens=meta.seq_lens[:1].copy())
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_attention(q, kc, vc, bad, 0.125, 0)


def test_unsupported_head_dim_is_refused(ops, rng):
    (q, kc, vc, meta), _ = attention_case(ops, rng, [1], [5], 2, 1, 64, 16)
    with pytest.raises(ValueError, match="head_dim 48"):
        ops.paged_attention(ops.zeros((1, 2, 48), ops.dtype), ops.zeros((4, 16, 1, 48), ops.dtype),
                            ops.zeros((4, 16, 1, 48), ops.dtype), meta, 0.1, 0)


# --- a whole model through the engine -------------------------------------------------------
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=128,
            intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
            attention_bias=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A random Llama with head_dim 64 (a size the attention kernels have), GQA 4:2 and QKV biases;
    written with NumPy, the tokenizer borrowed from the default model."""
    from safetensors.numpy import save_file

    from cupaged.model.config import ModelConfig
    from cupaged.model.llama import expected_tensors

    out = tmp_path_factory.mktemp("tiny-llama-d64")
    (out / "config.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(7)
    tensors = {}
    for name, shape in expected_tensors(ModelConfig.from_dict(TINY)).items():
        if name.endswith("norm.weight"):
            tensors[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith(".bias"):
            tensors[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, out / f)
    return out


def _llm(model_dir, backend):
    from cupaged.llm import LLM
    return LLM(model=str(model_dir), backend=backend, kv_cache_memory=4 * 2**20, max_num_batched_tokens=48,
               progress=False)


@pytest.fixture(scope="module")
def cpu_llm(tiny_dir):
    return _llm(tiny_dir, "cpu")


PROMPTS = [np.random.default_rng(3).integers(3, 512, n).tolist() for n in (5, 23, 70)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_llama_matches_cpu(tiny_dir, cpu_llm, device_kind, dtype):
    """Step-0 logits within half-precision tolerance, then greedy tokens through the engine (chunked
    prefill of the 70-token prompt, mixed steps, split decode past 64 keys) equal to the CPU's up to
    the first step where the CPU's top-2 margin is a near-tie."""
    from cupaged.sampling_params import SamplingParams
    from tests.model.helpers import engine_logits

    ops = CudaOps(make_device(device_kind), dtype=dtype, partition_size=PARTITION)
    llm = _llm(tiny_dir, ops)
    assert llm.engine.ops is ops and llm.engine.runner.kv_caches[0][0].dtype == ops.storage
    for ids in PROMPTS[:2]:
        want, got = engine_logits(cpu_llm.engine, ids), engine_logits(llm.engine, ids)
        assert got.dtype == np.float32
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=(0.02 if dtype == "float16" else 0.06) * scale)
        assert np.argmax(got) == np.argmax(want)

    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ours = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    theirs = cpu_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    if launched(ops) is not None:
        assert any(n.startswith("paged_decode_reduce") for n in launched(ops))
        assert any(n.startswith("paged_prefill") for n in launched(ops))
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        a, b = a.outputs[0].token_ids, b.outputs[0].token_ids
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                top = np.sort(engine_logits(cpu_llm.engine, prompt + b[:step]))[-2:]
                assert top[1] - top[0] < 0.1, f"greedy tokens differ at step {step}: {a} vs CPU {b}"
                break
        assert len(a) == len(b) == 5
