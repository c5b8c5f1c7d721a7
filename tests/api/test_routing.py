"""Every caller gets exactly its own outputs: interleaved streams, generate() while streams are open, an
app's own add_request / step loop, and threads sharing one LLM. A stream whose request ends elsewhere
ends too, and a stop string found by the output processor frees its blocks in that very step."""
from __future__ import annotations

import threading

import pytest

from cupaged.engine.output_processor import RequestQueue
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import assert_all_blocks_free, assert_same_or_tie, greedy, random_prompts


def alone(llm, prompt, n: int):
    """The reference: the prompt run by itself, with log-probs for near-tie checks."""
    return llm.generate(prompt, greedy(n, logprobs=2))[0].outputs[0]


def test_interleaved_streams_and_a_generate_between_their_steps(smol_llm):
    prompts = random_prompts([9, 23, 41, 17], seed=11)
    lengths = [12, 20, 16]
    refs = [alone(smol_llm, p, n) for p, n in zip(prompts, lengths)]
    ref_gen = alone(smol_llm, prompts[3], 10)
    streams = [smol_llm.stream_outputs(p, greedy(n)) for p, n in zip(prompts, lengths)]
    last = [None, None, None]
    texts = ["", "", ""]
    generated = None
    for turn in range(100):
        live = [i for i in range(3) if last[i] is None or not last[i].finished]
        if not live:
            break
        i = live[turn % len(live)]
        last[i] = next(streams[i])
        texts[i] += last[i].outputs[0].delta
        if turn == 5:  # a whole generate() call while the three streams are open
            generated = smol_llm.generate(prompts[3], greedy(10))[0].outputs[0]
    for i, ref in enumerate(refs):
        out = last[i].outputs[0]
        assert last[i].finished and out.finish_reason == "length"
        assert_same_or_tie(out.token_ids, ref.token_ids, ref.logprobs, f"stream {i}")
        if out.token_ids == ref.token_ids:
            assert texts[i] == out.text == ref.text
    assert_same_or_tie(generated.token_ids, ref_gen.token_ids, ref_gen.logprobs, "generate between streams")
    assert_all_blocks_free(smol_llm)


def test_a_stream_aborted_elsewhere_ends_with_abort(smol_llm):
    stream = smol_llm.stream_outputs(random_prompts([30], seed=12)[0], greedy(200))
    first = next(stream)
    smol_llm.engine.abort(first.request_id)
    rest = list(stream)  # ends at once: the abort's output is already in the stream's queue
    assert len(rest) == 1 and rest[0].finished and rest[0].outputs[0].finish_reason == "abort"
    assert_all_blocks_free(smol_llm)


def test_an_app_loop_gets_only_its_own_outputs_beside_an_open_stream(smol_llm):
    engine = smol_llm.engine
    prompts = random_prompts([15, 25], seed=13)
    ref = alone(smol_llm, prompts[1], 8)
    stream = smol_llm.stream_outputs(prompts[0], greedy(30))
    stream_id = next(stream).request_id
    mine = engine.add_request("app-request", prompts[1], greedy(8))
    seen, final = set(), None
    while not engine.is_finished(mine):
        for out in engine.step():
            seen.add(out.request_id)
            final = out if out.finished else final
    assert seen == {"app-request"} and final.outputs[0].finish_reason == "length"
    assert_same_or_tie(final.outputs[0].token_ids, ref.token_ids, ref.logprobs, "app loop")
    outs = list(stream)  # the stream lost nothing to the app's loop: its tokens arrive in order
    assert outs[-1].request_id == stream_id and len(outs[-1].outputs[0].token_ids) == 30
    assert_all_blocks_free(smol_llm)


def test_a_stop_string_frees_its_blocks_in_the_same_step(smol_llm):
    engine = smol_llm.engine
    prompt = random_prompts([20], seed=14)[0]
    text = alone(smol_llm, prompt, 24).text
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a string the output reaches mid-way
    assert stop.strip(), f"pick another seed: {text!r}"
    queue = RequestQueue()
    rid = engine.add_request(None, prompt, greedy(24, stop=[stop]), queue=queue)
    while not queue.finished:
        engine.step()
        if not queue.finished:
            assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    outs = list(queue.outputs)
    assert outs[-1].outputs[0].finish_reason == "stop" and stop not in outs[-1].outputs[0].text
    assert engine.is_finished(rid)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # freed in that step


def test_output_kinds(smol_llm):
    prompt = random_prompts([12], seed=15)[0]
    ref = alone(smol_llm, prompt, 9)
    queues = {kind: RequestQueue() for kind in ("cumulative", "delta", "final")}
    for kind, q in queues.items():
        smol_llm.engine.add_request(None, prompt, greedy(9, output_kind=kind), queue=q)
    while not all(q.finished for q in queues.values()):
        smol_llm.engine.step()
    cum, delta, final = (list(queues[k].outputs) for k in ("cumulative", "delta", "final"))
    assert len(final) == 1 and final[0].outputs[0].token_ids == cum[-1].outputs[0].token_ids
    assert [t for o in delta for t in o.outputs[0].token_ids] == cum[-1].outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in delta) == cum[-1].outputs[0].text == final[0].outputs[0].text
    assert_same_or_tie(final[0].outputs[0].token_ids, ref.token_ids, ref.logprobs, "final")


def test_two_threads_share_one_llm(smol_llm):
    prompts = random_prompts([14, 33], seed=16)
    refs = [alone(smol_llm, p, 12) for p in prompts]
    got, errors = [None, None], []

    def run(i):
        try:
            got[i] = smol_llm.generate(prompts[i], greedy(12))[0].outputs[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i in range(2):
        assert_same_or_tie(got[i].token_ids, refs[i].token_ids, refs[i].logprobs, f"thread {i}")
    assert_all_blocks_free(smol_llm)


def test_an_interrupted_generate_leaves_nothing_behind(smol_llm, monkeypatch):
    engine = smol_llm.engine
    calls = {"n": 0}
    real = engine.step

    def interrupted():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smol_llm.generate(random_prompts([10, 20], seed=17), greedy(50))
    monkeypatch.undo()
    assert_all_blocks_free(smol_llm)
    assert smol_llm.generate(random_prompts([5], seed=18), SamplingParams(max_tokens=3))[0].finished
