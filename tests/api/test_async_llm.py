"""AsyncLLM: the step loop in its own thread, each request's outputs on its caller's event loop.
Concurrent streams give the text each gives alone; bad input raises in the caller; a caller that goes
away aborts its request (counted, blocks freed); abort from elsewhere ends a stream; shutdown lets
requests finish within the grace period and aborts the rest."""
from __future__ import annotations

import asyncio

import pytest

from cupaged.async_llm import AsyncLLM, EngineClosedError
from cupaged.errors import InvalidRequestError
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import BLOCK_BYTES, greedy, random_prompts


@pytest.fixture(scope="module")
def async_llm(smollm2_dir):
    llm = AsyncLLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=256 * BLOCK_BYTES, max_model_len=1024,
                   progress=False)
    yield llm
    if llm.alive:
        asyncio.run(llm.shutdown(grace_s=0))


def delta(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind="delta")


async def collect(llm: AsyncLLM, prompt, params) -> tuple[str, list[int], str]:
    text, ids, reason = "", [], None
    async for out in llm.generate(prompt, params):
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
        reason = out.outputs[0].finish_reason
    return text, ids, reason


async def wait_idle(llm: AsyncLLM) -> None:
    for _ in range(500):
        if llm.num_unfinished() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("requests left behind")


def assert_pool_free(llm: AsyncLLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_concurrent_streams_match_each_alone(async_llm, smol_llm):
    prompts = random_prompts([7, 19, 33, 12, 25, 9], seed=11)
    alone = [smol_llm.generate(p, greedy(8))[0].outputs[0] for p in prompts]

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, delta(8)) for p in prompts))

    results = asyncio.run(main())
    assert [(t, ids) for t, ids, _ in results] == [(o.text, o.token_ids) for o in alone]
    assert {r for _, _, r in results} == {"length"}
    assert_pool_free(async_llm)


def test_bad_input_raises_in_the_caller(async_llm):
    async def main():
        with pytest.raises(InvalidRequestError, match="prompt token ids"):
            async for _ in async_llm.generate([1.5, 2.0], delta(2)):
                pass
        return await collect(async_llm, "Hello", delta(2))

    text, ids, reason = asyncio.run(main())
    assert len(ids) == 2 and reason == "length"


def test_a_caller_that_goes_away_aborts_its_request(async_llm):
    before = async_llm.stats.aborted_by_caller

    async def reader(prompt):
        async for _ in async_llm.generate(prompt, delta(200)):
            return  # closes the generator after the first output

    async def main():
        await asyncio.gather(*(reader(p) for p in random_prompts([10] * 5, seed=12)))
        await wait_idle(async_llm)

    asyncio.run(main())
    assert async_llm.stats.aborted_by_caller - before == 5
    assert_pool_free(async_llm)


def test_cancelled_task_aborts_its_request(async_llm):
    before = async_llm.stats.aborted_by_caller

    async def main():
        task = asyncio.create_task(collect(async_llm, "Tell me a long story", delta(300)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(async_llm)

    asyncio.run(main())
    assert async_llm.stats.aborted_by_caller - before == 1
    assert_pool_free(async_llm)


def test_abort_from_elsewhere_ends_the_stream(async_llm):
    async def main():
        outs = []
        async for out in async_llm.generate("Count to a thousand", delta(300), request_id="elsewhere"):
            outs.append(out)
            if len(outs) == 2:
                async_llm.abort("elsewhere")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort" and len(outs) < 300
    assert_pool_free(async_llm)


def test_shutdown_finishes_short_requests_and_aborts_long_ones(smollm2_dir):
    llm = AsyncLLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=64 * BLOCK_BYTES, max_model_len=512,
                   progress=False)

    async def main():
        short = asyncio.create_task(collect(llm, "Hi", delta(2)))
        long = asyncio.create_task(collect(llm, "Hello there", delta(400)))
        for _ in range(6000):  # both admitted before shutdown (a slow first step delays the second)
            if llm.stats.added == 2 or short.done() or long.done():
                break
            await asyncio.sleep(0.01)
        await llm.shutdown(grace_s=1.0)
        with pytest.raises(EngineClosedError):
            await collect(llm, "late", delta(2))
        return await short, await long

    (_, short_ids, short_reason), (_, long_ids, long_reason) = asyncio.run(main())
    assert short_reason == "length" and len(short_ids) == 2
    assert long_reason == "abort" and len(long_ids) < 400
    assert not llm.alive and llm.stats.aborted_at_shutdown == 1
    assert_pool_free(llm)
