"""The warm-up a server and the chat run before they are ready: it runs in the engine (its thread, for
AsyncLLM) and leaves nothing behind that a caller could see."""
from __future__ import annotations

import asyncio

import pytest

from cupaged.async_llm import AsyncLLM
from cupaged.engine.warm_up import warm_up
from cupaged.errors import CupagedError
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import BLOCK_BYTES

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPT = "The capital of France is"


def make(smollm2_dir, cls=LLM):
    return cls(model=str(smollm2_dir), backend="cpu", kv_cache_memory=64 * BLOCK_BYTES, max_model_len=256,
               progress=False)


def test_warm_up_leaves_no_trace(smollm2_dir):
    cold, warm = make(smollm2_dir), make(smollm2_dir)
    engine = warm.engine
    engine.scheduler.queue_times = []
    free, stats = engine.block_manager.num_free_blocks, engine.prefix_cache_stats()
    warm_up(engine)
    assert not engine.has_unfinished_requests() and not engine.outputs.states
    assert engine.block_manager.num_free_blocks == free
    assert engine.prefix_cache_stats() == stats and engine.scheduler.queue_times == []
    # what a caller then gets is what an engine without the warm-up gives, prefix cache and all
    for _ in range(2):
        assert warm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == \
            cold.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    assert engine.prefix_cache_stats() == cold.engine.prefix_cache_stats()


def test_warm_up_refuses_a_busy_engine(smollm2_dir):
    llm = make(smollm2_dir)
    rid = llm.engine.add_request(None, PROMPT, GREEDY)
    with pytest.raises(CupagedError, match="idle engine"):
        warm_up(llm.engine)
    assert not llm.engine.is_finished(rid)  # the running request is untouched


def test_async_warm_up_runs_in_the_engine_thread_before_serving(smollm2_dir):
    llm = make(smollm2_dir, AsyncLLM)
    llm.warm_up()
    assert llm.num_unfinished() == 0

    async def first():
        async for out in llm.generate(PROMPT, GREEDY):
            if out.finished:
                return out.outputs[0].text

    try:
        assert asyncio.run(first())
    finally:
        asyncio.run(llm.shutdown(0))
