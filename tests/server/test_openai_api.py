"""`cupaged serve` through the real `openai` client (sync and async): chat and completions, streaming
and not, n > 1, stop strings, seeds, logprobs in both shapes, usage in streams, /v1/models; greedy
answers equal the offline LLM's; streamed text equals the non-streamed text."""
from __future__ import annotations

import asyncio

import openai
import pytest

from cupaged.sampling_params import SamplingParams
from tests.server.conftest import API_KEY, MODEL, wait_idle

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_matches_the_offline_engine(client, served, smol_llm):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
    offline = smol_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=12)).outputs[0]
    assert reply.choices[0].message.content == offline.text
    assert reply.choices[0].message.role == "assistant"
    prompt_ids = smol_llm.chat_prompt(QUESTION)["prompt_token_ids"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(offline.token_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + len(offline.token_ids)
    wait_idle(served.llm)


def test_completion_stream_equals_whole_with_a_seed(client, served):
    kw = dict(model=MODEL, prompt="Once upon a time", temperature=0.9, seed=1234, max_tokens=20)
    whole = client.completions.create(**kw)
    again = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == again.choices[0].text == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    wait_idle(served.llm)


def test_n_samples_and_prompt_lists(client):
    reply = client.completions.create(model=MODEL, prompt=["The sky is", "Grass is"], n=2, temperature=1.0,
                                      seed=5, max_tokens=5, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert {c.finish_reason for c in reply.choices} == {"length"} and reply.usage.completion_tokens == 4 * 5


def test_token_id_prompts(client, smol_llm):
    ids = smol_llm.tokenizer.encode("Hello, my name is", add_special_tokens=False)
    reply = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6)
    offline = smol_llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert reply.choices[0].text == offline.text and reply.usage.prompt_tokens == len(ids)


def test_a_stop_string_is_never_streamed(client):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7,", temperature=0, max_tokens=40, stop=[" 9"])
    whole = client.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert whole.finish_reason == "stop" and " 9" not in whole.text and streamed == whole.text


def test_completion_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4,
                                      logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == reply.choices[0].text and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0 and max(top.values()) == pytest.approx(chosen)  # greedy: best


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    assert "".join(c.token for c in content) == reply.choices[0].message.content


def test_async_client_streams_chat_with_the_role_first(served):
    async def main():
        client = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=10, stream=True)]
        whole = await client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10)
        await client.close()
        return chunks, whole

    chunks, whole = asyncio.run(main())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
