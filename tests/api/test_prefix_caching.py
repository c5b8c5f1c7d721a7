"""Prefix caching on the real SmolLM2-135M-Instruct (CPU): a warm cache changes how much is
computed, never what is generated.

The reference is an engine with `enable_prefix_caching=False`, so every token there is computed
from scratch. Expected hit counts are worked out from the block size (16): a shared prefix of
P tokens lends its P // 16 full blocks to every later request that starts with it.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.engine.prefix_cache import PrefixCacheStats
from cupaged.errors import InvalidRequestError
from cupaged.llm import LLM
from tests.api.test_generate import BLOCK_BYTES, assert_all_blocks_free, assert_same_or_tie, greedy

BS = 16


@pytest.fixture(scope="module")
def cold_llm(smollm2_dir):
    """The reference: no prefix caching."""
    return LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=256 * BLOCK_BYTES, max_model_len=1024,
               enable_prefix_caching=False, progress=False)


def shared_prefix_prompts(prefix_len: int, suffix_lens: list[int], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(100, 49_000, size=prefix_len).tolist()
    return [{"prompt_token_ids": prefix + rng.integers(100, 49_000, size=n).tolist()} for n in suffix_lens]


def assert_same_as_cold(got, ref, what: str) -> None:
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_same_or_tie(g.outputs[0].token_ids, r.outputs[0].token_ids, r.outputs[0].logprobs, f"{what}, prompt {i}")


def stats_of(llm: LLM) -> PrefixCacheStats:
    return llm.engine.prefix_cache_stats()


def test_warm_cache_gives_the_cold_tokens(smol_llm, cold_llm):
    prompts = shared_prefix_prompts(150, [9, 5, 17, 30, 41], seed=10)
    params = greedy(10, logprobs=2)
    ref = cold_llm.generate(prompts, params)
    assert stats_of(cold_llm) == PrefixCacheStats(0, 0), "caching off counts nothing"
    smol_llm.generate(prompts[0], params)  # warms the cache with the prefix's 9 full blocks
    before = stats_of(smol_llm)
    got = smol_llm.generate(prompts[1:], params)
    delta = stats_of(smol_llm) - before
    assert delta == PrefixCacheStats(sum(len(p["prompt_token_ids"]) for p in prompts[1:]), 4 * (150 // BS) * BS)
    assert_same_as_cold(got, ref[1:], "warm cache vs caching off")
    # the same prompt again reuses all but its partial last block (and at least one token)
    before = stats_of(smol_llm)
    again = smol_llm.generate(prompts[3], params)
    n = len(prompts[3]["prompt_token_ids"])
    assert stats_of(smol_llm) - before == PrefixCacheStats(n, (n - 1) // BS * BS)
    assert_same_as_cold(again, ref[3:4], "a repeated prompt")
    assert_all_blocks_free(smol_llm)


def test_preempted_requests_resume_on_cached_blocks(smollm2_dir, cold_llm):
    """24 blocks: five ~75-token prompts with a 48-token shared prefix overflow the pool while
    decoding, so some are preempted; they come back on their own (or the shared) cached blocks."""
    llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256,
              progress=False)
    prompts = shared_prefix_prompts(48, [27, 22, 30, 24, 28], seed=11)
    params = greedy(24, logprobs=2)
    got = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0, "the workload was meant to force preemption"
    stats = stats_of(llm)
    assert stats.hits > 0 and stats.queries > sum(len(p["prompt_token_ids"]) for p in prompts), \
        "resumed sequences look up again, and find blocks"
    assert_same_as_cold(got, cold_llm.generate(prompts, params), "preemption with a warm cache")
    assert_all_blocks_free(llm)


def test_chunked_prefill_after_a_cached_prefix(smollm2_dir, cold_llm):
    llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=64 * BLOCK_BYTES, max_model_len=256,
              max_num_batched_tokens=16, progress=False)
    first, second = shared_prefix_prompts(100, [3, 30], seed=12)
    params = greedy(5, logprobs=2)
    llm.generate(first, params)
    llm.engine.add_request("second", second, params)
    steps, outputs = 0, []
    while llm.engine.has_unfinished_requests():
        steps += 1
        outputs += llm.engine.step()
    # 96 of 130 prompt tokens come from the cache; 34 are prefilled in chunks of 16, 16, 2
    assert stats_of(llm).hits == 96
    assert steps == 3 + 4, "three prefill steps, then four decodes"
    ref = cold_llm.generate(second, params)
    assert_same_as_cold(outputs[-1:], ref, "chunked prefill on top of a cached prefix")
    assert_all_blocks_free(llm)


def test_salts_isolate_requests(smol_llm):
    prompt = shared_prefix_prompts(64, [8], seed=13)[0]
    n = len(prompt["prompt_token_ids"])
    params = greedy(2)

    def hits(**kwargs) -> int:
        before = stats_of(smol_llm)
        smol_llm.generate(kwargs.pop("p", prompt), params, **kwargs)
        return (stats_of(smol_llm) - before).hits

    assert hits(p={**prompt, "cache_salt": "tenant-a"}) == 0
    assert hits(p={**prompt, "cache_salt": "tenant-b"}) == 0, "another salt finds nothing"
    assert hits() == 0, "no salt finds nothing either"
    assert hits(cache_salt="tenant-a") == (n - 1) // BS * BS, "the same salt, given per call"
    assert hits(p={**prompt, "cache_salt": "tenant-c"}, cache_salt="tenant-a") == 0, \
        "a prompt's own salt wins over the call's"
    for bad in ("", 7):
        with pytest.raises(InvalidRequestError, match="cache_salt must be a non-empty string"):
            smol_llm.generate({**prompt, "cache_salt": bad}, params)
    assert_all_blocks_free(smol_llm)
