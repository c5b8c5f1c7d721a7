"""The offline API on the real SmolLM2-135M-Instruct (CPU): batching, preemption and chunked
prefill leave greedy outputs unchanged, and generate/chat/stream/abort behave as documented.

References are independent of the code under test: a request run alone, the tokenizer's own
decode, and (for the rare token that differs) the reference run's own top-2 log-probabilities,
which must show a genuine near-tie.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from cupaged.engine.scheduler import ScheduledBatch
from cupaged.engine.sequence import Sequence
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams

TIE = 1e-3  # a top-1 vs top-2 log-prob gap below this is a near-tie: float noise may flip it
BLOCK_BYTES = 16 * 2 * 30 * 3 * 64 * 4  # one 16-token KV block of SmolLM2-135M in float32


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def random_prompts(lengths, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(100, 49_000, size=int(n)).tolist()} for n in lengths]


def assert_same_or_tie(got: list[int], ref: list[int], ref_logprobs: list[dict[int, float]], what: str) -> None:
    """Identical greedy tokens; the first difference is forgiven only at a near-tie of the reference."""
    for step, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            top = sorted(ref_logprobs[step].values(), reverse=True)
            gap = top[0] - top[1]
            assert gap < TIE, (f"{what}: token {step} is {a}, the reference chose {b} with a top-2 log-prob "
                               f"gap of {gap:.2e}, which is not a near-tie (< {TIE})")
            return  # after a legitimate flip the continuations may diverge
    assert len(got) == len(ref), f"{what}: {len(got)} tokens, reference has {len(ref)}"


def assert_all_blocks_free(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# --- invariance -------------------------------------------------------------------------------
def teacher_forced_logprobs(engine, prompt: list[int], output: list[int]) -> np.ndarray:
    """log_softmax [len(output), V] (float64) of the model at each output position, from ONE prefill
    of prompt + output[:-1] for this sequence alone: the greedy choices a lone run would make."""
    ids = prompt + output[:-1]
    seq = Sequence("teacher-forced", ids, SamplingParams(max_tokens=1))
    engine.block_manager.append_slots(seq, len(ids))
    try:
        input_ids, meta = engine.runner.prepare(ScheduledBatch([seq], [len(ids)]))
        rows = np.arange(len(prompt) - 1, len(ids), dtype=np.int32)
        meta = dataclasses.replace(meta, logits_indices=engine.ops.asarray(rows))
        logits = engine.ops.to_numpy(engine.model.forward(input_ids, meta, engine.runner.kv_caches))
    finally:
        engine.block_manager.free(seq)
    logits = logits.astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))


def test_batch_of_32_equals_each_alone(smol_llm):
    engine = smol_llm.engine
    lengths = np.linspace(5, 200, 32).astype(int)  # 1 to 14 blocks of 16 with the output
    prompts = random_prompts(lengths, seed=0)
    params = greedy(12, logprobs=2)
    batched = smol_llm.generate(prompts, params)
    # Every request against its own lone teacher-forced prefill: each batched token is the lone argmax
    # (teacher forcing keeps later positions comparable even after a near-tie flip).
    for i, (prompt, out) in enumerate(zip(prompts, batched)):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 12
        lp = teacher_forced_logprobs(engine, prompt["prompt_token_ids"], tokens)
        for step, token in enumerate(tokens):
            top2 = np.sort(lp[step])[-2:]
            assert lp[step, token] == top2[1] or top2[1] - lp[step, token] < TIE, (
                f"prompt {i} ({lengths[i]} tokens), token {step}: the batch chose {token} but alone the argmax "
                f"is {int(np.argmax(lp[step]))}, {top2[1] - lp[step, token]:.2e} above it (not a near-tie)")
    # A spread of them also really run alone, through the same decode path, cold (a salt keeps the
    # prefix cache the batch filled out of it).
    for i in (0, 9, 20, 31):
        alone = smol_llm.generate(prompts[i], params, cache_salt=f"alone-{i}")[0].outputs[0]
        assert_same_or_tie(batched[i].outputs[0].token_ids, alone.token_ids, alone.logprobs,
                           f"prompt {i} ({lengths[i]} tokens) in a batch of 32 vs alone")
    assert_all_blocks_free(smol_llm)


@pytest.fixture(scope="module")
def tight_llm(smollm2_dir):
    """24 KV blocks (384 tokens): a few 100-token sequences already overflow it."""
    return LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256,
               progress=False)


def test_preemption_keeps_greedy_outputs(smol_llm, tight_llm):
    assert tight_llm.engine.block_manager.num_blocks == 24
    prompts = random_prompts([75, 70, 78, 72, 76], seed=1)  # 5 blocks each at first, 7 by the end
    params = greedy(24, logprobs=2)
    before = tight_llm.engine.scheduler.num_preemptions
    got = tight_llm.generate(prompts, params)
    assert tight_llm.engine.scheduler.num_preemptions > before, "the workload was meant to force preemption"
    ref = smol_llm.generate(prompts, params)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.outputs[0].finish_reason == "length"
        assert_same_or_tie(g.outputs[0].token_ids, r.outputs[0].token_ids, r.outputs[0].logprobs,
                           f"prompt {i} under preemption vs a roomy cache")
    assert_all_blocks_free(tight_llm)


def test_chunked_prefill_keeps_greedy_outputs(smol_llm, smollm2_dir):
    llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256,
              max_num_batched_tokens=16, progress=False)
    prompt = random_prompts([100], seed=2)[0]
    params = greedy(6, logprobs=2)
    llm.engine.add_request("chunked", prompt, params)
    steps, outputs = 0, []
    while llm.engine.has_unfinished_requests():
        steps += 1
        outputs += llm.engine.step()
        if not outputs:
            assert llm.engine.scheduler.running[0].num_computed_tokens == min(16 * steps, 100)
    assert steps == 7 + 5, "a 100-token prompt under a 16-token budget takes 7 prefill steps, then 5 decodes"
    ref = smol_llm.generate(prompt, params)[0].outputs[0]
    assert_same_or_tie(outputs[-1].outputs[0].token_ids, ref.token_ids, ref.logprobs, "chunked prefill")
    assert_all_blocks_free(llm)


def test_chunking_off_keeps_greedy_outputs(smollm2_dir):
    """Two streams decode while longer prompts arrive: prompts chunked under a 16-token budget
    and prompts joined whole (one long step) give the same greedy tokens."""
    prompts = random_prompts([10, 12, 70, 45], seed=3)
    params = greedy(8, logprobs=2)
    outputs, largest_step = {}, {}
    for chunked in (True, False):
        llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=64 * BLOCK_BYTES, max_model_len=256,
                  max_num_batched_tokens=16, enable_chunked_prefill=chunked, progress=False)
        engine, steps = llm.engine, []
        schedule = engine.scheduler.schedule
        engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
        engine.add_request("a", prompts[0], params)
        engine.add_request("b", prompts[1], params)
        engine.step()
        engine.step()
        engine.add_request("c", prompts[2], params)
        engine.add_request("d", prompts[3], params)
        done = {}
        while engine.has_unfinished_requests():
            done.update((out.request_id, out.outputs[0]) for out in engine.step() if out.finished)
        outputs[chunked] = [done[rid] for rid in "abcd"]
        largest_step[chunked] = max(batch.total_tokens for batch in steps)
        if not chunked:  # every prompt computed in one step
            prompt_steps = Counter(s.request_id for b in steps for s, n in zip(b.seqs, b.num_tokens) if n > 1)
            assert all(v == 1 for v in prompt_steps.values()) and len(prompt_steps) == 4
        assert_all_blocks_free(llm)
    assert largest_step == {True: 16, False: 70 + 2}, "the 70-token prompt joins whole beside the two streams"
    for rid, on, off in zip("abcd", outputs[True], outputs[False]):
        assert_same_or_tie(off.token_ids, on.token_ids, on.logprobs, f"request {rid} without chunking vs chunked")


# --- generate / chat ----------------------------------------------------------------------------
TEXTS = ["The capital of France is", "def fibonacci(n):"]


def test_generate_strings_and_token_ids(smol_llm):
    tok = smol_llm.tokenizer
    params = greedy(6)
    by_text = smol_llm.generate(TEXTS, params)
    by_ids = smol_llm.generate([{"prompt_token_ids": tok.encode(t)} for t in TEXTS], params)
    mixed = smol_llm.generate([TEXTS[0], {"prompt_token_ids": tok.encode(TEXTS[1])}], params)
    for i, text in enumerate(TEXTS):
        a, b, c = by_text[i], by_ids[i], mixed[i]
        assert a.prompt == text and a.prompt_token_ids == tok.encode(text)
        assert b.prompt is None and b.prompt_token_ids == tok.encode(text)
        out = a.outputs[0]
        assert len(out.token_ids) == 6 and out.finish_reason == "length"
        assert out.text == tok.decode(out.token_ids)
        assert b.outputs[0].token_ids == out.token_ids == c.outputs[0].token_ids
    assert mixed[0].prompt == TEXTS[0] and mixed[1].prompt is None
    assert by_text[0].request_id != by_text[1].request_id
    assert_all_blocks_free(smol_llm)


def test_generate_one_prompt_and_params_per_prompt(smol_llm):
    one = smol_llm.generate(TEXTS[0], greedy(3))
    assert len(one) == 1 and len(one[0].outputs[0].token_ids) == 3
    two = smol_llm.generate(TEXTS, [greedy(2), greedy(4)])
    assert [len(o.outputs[0].token_ids) for o in two] == [2, 4]
    assert two[0].outputs[0].token_ids == one[0].outputs[0].token_ids[:2]
    assert two[0].prompt == TEXTS[0] and two[1].prompt == TEXTS[1]
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        smol_llm.generate(TEXTS, [greedy(2)])


def test_eos_stops_unless_ignored(smol_llm):
    chat = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]
    eos = smol_llm.engine.eos_token_ids
    out = smol_llm.chat(chat, SamplingParams(temperature=0, max_tokens=24, logprobs=2)).outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in eos, "the model answers briefly and ends its turn"
    assert len(out.token_ids) < 24
    assert out.text == smol_llm.tokenizer.decode(out.token_ids[:-1]) and "4" in out.text
    assert "<|im_end|>" not in out.text
    longer = smol_llm.chat(chat, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 3,
                                                ignore_eos=True)).outputs[0]
    assert longer.finish_reason == "length" and len(longer.token_ids) == len(out.token_ids) + 3
    assert_same_or_tie(longer.token_ids[:len(out.token_ids)], out.token_ids, out.logprobs, "ignore_eos")


def test_chat_renders_the_template(smol_llm):
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    prompt = smol_llm.chat_prompt(chat)
    assert prompt["prompt"].endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompt["prompt"]
    assert prompt["prompt_token_ids"] == smol_llm.tokenizer.encode(prompt["prompt"], add_special_tokens=False)
    params = greedy(5)
    out = smol_llm.chat(chat, params)
    assert out.prompt == prompt["prompt"] and out.prompt_token_ids == prompt["prompt_token_ids"]
    direct = smol_llm.generate({"prompt_token_ids": prompt["prompt_token_ids"]}, params)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    assert out.outputs[0].text == smol_llm.tokenizer.decode(out.outputs[0].token_ids)


# --- streaming and abort ------------------------------------------------------------------------
def test_stream_deltas_add_up_to_the_text(smol_llm):
    prompt = "Translate to French: good morning, my friend. Answer:"
    params = greedy(7)
    full = smol_llm.generate(prompt, params)[0].outputs[0]
    deltas = list(smol_llm.stream(prompt, params))
    assert deltas and all(deltas)
    assert "".join(deltas) == full.text == smol_llm.tokenizer.decode(full.token_ids)
    outs = list(smol_llm.stream_outputs(prompt, params))
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].token_ids == full.token_ids
    assert_all_blocks_free(smol_llm)


def test_closing_a_stream_aborts_and_frees_blocks(smol_llm):
    stream = smol_llm.stream(random_prompts([40], seed=3)[0], greedy(100))
    next(stream)
    next(stream)
    assert smol_llm.engine.block_manager.num_free_blocks < smol_llm.engine.block_manager.num_blocks
    stream.close()
    assert_all_blocks_free(smol_llm)


def test_engine_abort_frees_blocks_and_others_finish(smol_llm):
    engine, bm = smol_llm.engine, smol_llm.engine.block_manager
    prompts = random_prompts([30, 50, 70], seed=4)
    params = greedy(8, logprobs=2)
    ref = smol_llm.generate([prompts[0], prompts[2]], params)
    for rid, prompt in zip("abc", prompts):
        assert engine.add_request(rid, prompt, params) == rid
    finals = {}
    for _ in range(3):
        for out in engine.step():
            assert not out.finished
    held = {rid: sum(len(s.block_table) for s in engine.requests[rid].seqs) for rid in "abc"}
    assert all(held.values()) and bm.num_free_blocks == bm.num_blocks - sum(held.values())
    engine.abort("b")
    engine.abort("no-such-request")  # a no-op
    assert bm.num_free_blocks == bm.num_blocks - held["a"] - held["c"]
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "b", "an aborted request produced output"
            if out.finished:
                finals[out.request_id] = out
    assert sorted(finals) == ["a", "c"]
    for rid, r in zip("ac", ref):
        assert finals[rid].outputs[0].finish_reason == "length"
        assert_same_or_tie(finals[rid].outputs[0].token_ids, r.outputs[0].token_ids, r.outputs[0].logprobs,
                           f"request {rid} after its neighbour was aborted")
    assert_all_blocks_free(smol_llm)


def test_n_2_gives_two_outputs(smol_llm):
    prompt = TEXTS[0]
    one = smol_llm.generate(prompt, greedy(6))[0].outputs[0]
    two = smol_llm.generate(prompt, greedy(6, n=2))[0].outputs
    assert [o.index for o in two] == [0, 1]
    for o in two:  # two greedy copies that share the prompt's blocks must both equal the single run
        assert o.token_ids == one.token_ids and o.text == one.text and o.finish_reason == "length"
    sampled = smol_llm.generate(prompt, SamplingParams(n=2, temperature=1.5, seed=5, max_tokens=8,
                                                       ignore_eos=True))[0].outputs
    assert len(sampled) == 2 and all(len(o.token_ids) == 8 for o in sampled)
    assert sampled[0].token_ids != sampled[1].token_ids, "two samples at temperature 1.5 should differ"
    assert_all_blocks_free(smol_llm)
