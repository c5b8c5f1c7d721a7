"""The whole engine on a real GPU (`pytest -m gpu`; skipped without CuPy and a device).

- SmolLM2-135M-Instruct in fp16 and bf16 against the CPU backend (fp32): step-0 logits within half
  precision's tolerance, step-0 top-5 the same, and greedy tokens identical up to the first step where
  the CPU's top-1 leads its runner-up by less than NEAR_TIE logits. The same on a tiny random
  transformers model, which needs no download (the GPU machine has no internet: SmolLM2 skips when it
  is not converted already).
- 256 concurrent requests of mixed lengths: every one finishes with its length, each token is the
  argmax (up to near-ties) of one teacher-forced prefill of the request's prompt and own output, run
  alone, and no block leaks.
- CUDA graphs on and off give identical tokens.

The engine tests past the tiny model run on a model of SmolLM2's shape with random weights and its real
tokenizer (weights/random_model.py), built on the machine from the files CUPAGED_GPU_MODEL_FILES names
(config.json and tokenizer files, carried by scripts/gpu_suite.sh) or from a converted SmolLM2 here;
only test_smollm2_matches_cpu needs the real weights. Every engine gets a fixed KV pool (KV_BYTES), so
no test's pool depends on what an earlier test left on the device; the one that sizes its pool from
device memory frees its first engine before it makes the second.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from cupaged.errors import CupagedError
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.model.helpers import engine_logits

pytestmark = pytest.mark.gpu
NEAR_TIE = 0.1                                      # logits
REL_TOL = {"float16": 2e-2, "bfloat16": 6e-2}       # of the largest |logit|
DTYPES = ["float16", "bfloat16"]
KV_BYTES = 4 * 2**30                                # each GPU engine's KV pool: ~180k SmolLM2 tokens in fp16


@pytest.fixture(scope="module", autouse=True)
def cuda_device():
    from tests.emu.gpu import gpu_skip_reason
    if (why := gpu_skip_reason()) is not None:
        pytest.skip(f"gpu: {why}")


@pytest.fixture(scope="module")
def smol_dir():
    from cupaged.weights.catalog import DEFAULT_MODEL
    from cupaged.weights.store import resolve_model
    try:
        return resolve_model(DEFAULT_MODEL, progress=False)
    except CupagedError as e:  # no internet and no converted copy on this machine
        pytest.skip(f"SmolLM2 is not available here: {e}")


@pytest.fixture(scope="module")
def shaped_dir(tmp_path_factory):
    """SmolLM2's shape and tokenizer, random weights: from CUPAGED_GPU_MODEL_FILES, else a local SmolLM2."""
    from cupaged.weights.random_model import build_random_model
    files = os.environ.get("CUPAGED_GPU_MODEL_FILES")
    if not files:
        from cupaged.weights.catalog import DEFAULT_MODEL
        from cupaged.weights.store import resolve_model
        try:
            files = resolve_model(DEFAULT_MODEL, progress=False)
        except CupagedError as e:
            pytest.skip(f"no SmolLM2 files: set CUPAGED_GPU_MODEL_FILES (scripts/gpu_suite.sh does): {e}")
    return build_random_model(Path(files), tmp_path_factory.mktemp("random-smollm2"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.model.tiny_models import build_tiny_model
    return build_tiny_model("llama-hd64", tmp_path_factory.mktemp("hd64"))  # its own tokenizer: no download


def cpu_llm(model_dir) -> LLM:
    return LLM(model=str(model_dir), backend="cpu", kv_cache_memory=256 * 2**20, max_model_len=2048, progress=False)


def gpu_llm(model_dir, dtype: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 2048)
    if "gpu_memory_utilization" not in kwargs:
        kwargs.setdefault("kv_cache_memory", KV_BYTES)
    return LLM(model=str(model_dir), backend="cuda", dtype=dtype, progress=False, **kwargs)


def release(llm: LLM) -> None:
    """Free an engine's device memory now (its KV pool and weights), not when a traceback lets go of it."""
    ops = llm.engine.ops
    llm.engine = None
    gc.collect()
    ops.device.release_cached()


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(100, vocab - 100, int(n)).tolist()} for n in lengths]


def assert_greedy_until_near_tie(ours: list[int], ref_tokens: list[int], ref_logprobs: list[dict]) -> None:
    for step, (a, b) in enumerate(zip(ours, ref_tokens)):
        if a != b:
            top2 = sorted(ref_logprobs[step].values(), reverse=True)[:2]
            assert top2[0] - top2[1] < NEAR_TIE, f"step {step}: {a} != {b} without a near-tie in the reference"
            return
    assert len(ours) == len(ref_tokens)


def check_against_cpu(gpu: LLM, cpu: LLM, prompts: list[dict], dtype: str, n: int = 32) -> None:
    for prompt in prompts:
        ids = prompt["prompt_token_ids"]
        ours, ref = engine_logits(gpu.engine, ids), engine_logits(cpu.engine, ids)
        assert np.abs(ours - ref).max() <= REL_TOL[dtype] * np.abs(ref).max()
        assert set(np.argsort(-ours)[:5]) == set(np.argsort(-ref)[:5])
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
    for a, b in zip(gpu.generate(prompts, params), cpu.generate(prompts, params)):
        assert_greedy_until_near_tie(a.outputs[0].token_ids, b.outputs[0].token_ids, b.outputs[0].logprobs)


# Most informative first: a first run on a new card that hits the suite's deadline still says the most.
def test_auto_backend_picks_cuda():
    from cupaged.backend import get_ops
    ops = get_ops("auto")
    assert ops.name == "cuda" and ops.dtype_name == "float16"


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_model_matches_cpu(tiny_dir, dtype):
    from tests.model.tiny_models import VOCAB
    cpu = LLM(model=str(tiny_dir), backend="cpu", kv_cache_memory=64 * 2**20, progress=False)
    gpu = gpu_llm(tiny_dir, dtype, max_model_len=None, kv_cache_memory=256 * 2**20)
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": rng.integers(3, VOCAB, n).tolist()} for n in (1, 17, 120)]
    check_against_cpu(gpu, cpu, prompts, dtype, n=24)
    release(gpu)


def test_256_concurrent_requests_of_mixed_lengths(shaped_dir):
    from tests.api.test_generate import teacher_forced_logprobs
    llm = gpu_llm(shaped_dir, "float16", max_num_seqs=256)
    engine = llm.engine
    rng = np.random.default_rng(0)
    lengths, outs = rng.integers(4, 600, 256), rng.integers(4, 48, 256)
    prompts = random_prompts(lengths, engine.model_config.vocab_size, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in outs]
    results = llm.generate(prompts, params)
    assert [len(r.outputs[0].token_ids) for r in results] == outs.tolist()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    for i in rng.choice(256, 16, replace=False):  # each output is the greedy path of the model itself
        output = results[i].outputs[0].token_ids
        logprobs = teacher_forced_logprobs(engine, prompts[i]["prompt_token_ids"], output)
        for step, token in enumerate(output):
            lead = logprobs[step].max() - logprobs[step][token]
            assert lead < NEAR_TIE, f"request {i} step {step}: token {token} is {lead:.3f} below the argmax"
    release(llm)


def test_graphs_on_and_off_give_identical_tokens(shaped_dir):
    graphed = gpu_llm(shaped_dir, "float16", max_num_seqs=16)
    eager = gpu_llm(shaped_dir, "float16", max_num_seqs=16, enforce_eager=True)
    assert graphed.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    vocab = graphed.engine.model_config.vocab_size
    same = random_prompts([37] * 8, vocab, seed=4)  # a batch of exactly 8, a captured size, all the way
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert ([r.outputs[0].token_ids for r in graphed.generate(same, params)]
            == [r.outputs[0].token_ids for r in eager.generate(same, params)])
    mixed = random_prompts([5, 90, 300, 600, 1000], vocab, seed=5)  # padded to 8, then 4, 2, 1 as they finish
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2) for n in (8, 16, 24, 32, 40)]
    for a, b in zip(graphed.generate(mixed, params), eager.generate(mixed, params)):
        assert_greedy_until_near_tie(a.outputs[0].token_ids, b.outputs[0].token_ids, b.outputs[0].logprobs)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)
    assert (graphed.generate(same[:3], seeded)[0].outputs[0].token_ids
            == eager.generate(same[:3], seeded)[0].outputs[0].token_ids)
    release(graphed)
    release(eager)


def test_kv_pool_is_sized_from_device_memory(shaped_dir):
    import cupy
    llm = gpu_llm(shaped_dir, "float16", gpu_memory_utilization=0.5)
    engine = llm.engine
    per_block = engine.config.block_size * engine.model_config.kv_bytes_per_token(2)
    _, total = cupy.cuda.runtime.memGetInfo()
    pool = engine.block_manager.num_blocks * per_block
    assert 0 < pool <= 0.5 * total
    smaller = engine.block_manager.num_blocks
    release(llm)  # the second engine is sized against what the first leaves
    bigger = gpu_llm(shaped_dir, "float16", gpu_memory_utilization=0.6)
    assert bigger.engine.block_manager.num_blocks > smaller
    release(bigger)


@pytest.mark.parametrize("dtype", DTYPES)
def test_smollm2_matches_cpu(smol_dir, dtype):
    """The real weights (the suite's optional second stage: they must be carried to the machine)."""
    cpu, gpu = cpu_llm(smol_dir), gpu_llm(smol_dir, dtype)
    assert gpu.engine.ops.name == "cuda" and gpu.engine.ops.dtype_name == dtype
    chat = cpu.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    text = {"prompt_token_ids": cpu.tokenizer.encode("The paged KV cache stores keys and values in blocks")}
    check_against_cpu(gpu, cpu, [chat, text, *random_prompts([700], 49152, seed=1)], dtype)
    release(gpu)
