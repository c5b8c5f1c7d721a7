"""What paging makes possible, on the CUDA backend in emulation (CudaOps over EmuDevice, fp16):
prefix caching, copy-on-write sharing for n > 1 (the copy_blocks kernel), beam search and chunked
prefill, on a tiny random head_dim-64 model so that emulation stays fast. Swap has its own
emulation test (tests/backend/test_swap_emu.py).

References are independent runs: a cold engine with prefix caching off, each sample alone, the
CPU backend's fp32 log-probabilities of the returned beams.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.backend.cuda import CudaOps
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.emu.device import EmuDevice
from tests.model.helpers import engine_logits
from tests.model.tiny_models import VOCAB, build_tiny_model

pytest.importorskip("transformers")
BS = 16


@pytest.fixture(scope="module")
def tiny_hd64(tmp_path_factory, smollm2_dir):
    return build_tiny_model("llama-hd64", tmp_path_factory.mktemp("hd64"), smollm2_dir)


def emu_llm(model_dir, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 2 * 2**20)
    return LLM(model=str(model_dir), backend=CudaOps(EmuDevice(), dtype="float16", partition_size=32),
               max_model_len=128, progress=False, **kwargs)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def greedy(n_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True, **kw)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_prefix_cache_hits_give_the_cold_tokens(tiny_hd64):
    warm, cold = emu_llm(tiny_hd64), emu_llm(tiny_hd64, enable_prefix_caching=False)
    prefix = ids(40, seed=1)  # two full blocks, shared
    prompts = [{"prompt_token_ids": prefix + ids(n, seed=2 + n)} for n in (3, 9, 20)]
    first = warm.generate(prompts[:1], greedy(5))
    before = warm.engine.prefix_cache_stats()
    rest = warm.generate(prompts[1:], greedy(5))
    after = warm.engine.prefix_cache_stats()
    assert after.hits - before.hits == 2 * 2 * BS  # each later prompt reuses the prefix's two full blocks
    assert tokens(first + rest) == tokens(cold.generate(prompts, greedy(5)))


def test_parallel_samples_share_the_prompt_and_copy_on_write(tiny_hd64):
    llm = emu_llm(tiny_hd64, enable_prefix_caching=False)
    device = llm.engine.ops.device
    prompt = {"prompt_token_ids": ids(21, seed=7)}  # one full block and a shared partial one
    device.launches.clear()
    out = llm.generate(prompt, greedy(6, n=3))[0]
    assert device.launches.count("copy_blocks_f16") >= 1  # the partial block, copied on the first write
    alone = llm.generate(prompt, greedy(6))[0].outputs[0].token_ids
    assert [o.token_ids for o in out.outputs] == [alone] * 3  # greedy samples: each equals the lone run
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_beam_search_returns_scored_beams_of_the_model(tiny_hd64):
    llm = emu_llm(tiny_hd64, enable_prefix_caching=False)
    cpu = LLM(model=str(tiny_hd64), backend="cpu", kv_cache_memory=16 * 2**20, max_model_len=128, progress=False)
    prompt = ids(12, seed=9)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(use_beam_search=True, best_of=3, n=2,
                                                                      temperature=0, max_tokens=5,
                                                                      ignore_eos=True))[0]
    assert len(out.outputs) == 2
    scores = [o.cumulative_logprob for o in out.outputs]
    assert scores[0] >= scores[1]
    for o in out.outputs:  # the reported score is the fp32 model's log-probability of that continuation
        seq, total = list(prompt), 0.0
        for t in o.token_ids:
            logits = engine_logits(cpu.engine, seq).astype(np.float64)
            total += logits[t] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            seq.append(t)
        assert o.cumulative_logprob == pytest.approx(total, abs=5e-2)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_chunked_prefill_gives_the_whole_prefill_tokens(tiny_hd64):
    chunked = emu_llm(tiny_hd64, max_num_batched_tokens=16, enable_prefix_caching=False)
    whole = emu_llm(tiny_hd64, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": ids(n, seed=20 + n)} for n in (5, 37)]
    assert tokens(chunked.generate(prompts, greedy(4))) == tokens(whole.generate(prompts, greedy(4)))
