"""n > 1 parallel samples share their prompt's KV blocks (one prefill, then fork + copy-on-write).

The reference for every sample is the same sample run alone: a fresh Sequence with the same
output index (so the same seeded stream), prefilled and decoded one token at a time through the
paged cache with no block shared, drawn by a fresh Sampler. Scheduler-level rules the sharing
needs (seats for the forks, waiting beams, making room for a lagging beam) are checked without
a model.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sampler import Sampler
from cupaged.engine.scheduler import ScheduledBatch, Scheduler
from cupaged.engine.sequence import Sequence
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import BLOCK_BYTES, assert_all_blocks_free, assert_same_or_tie, greedy, random_prompts


def seeded(n: int, max_tokens: int, seed: int = 11, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_alone(engine, prompt: list[int], params: SamplingParams, index: int) -> Sequence:
    """Sample `index` of a request, alone: prefill, then one decode per token, nothing shared."""
    seq = Sequence(f"alone-{index}", prompt, params, index=index)
    sampler = Sampler(None, engine.ops)
    try:
        while seq.num_output_tokens < params.max_tokens:
            n = seq.num_uncomputed_tokens
            assert engine.block_manager.append_slots(seq, n) == []
            logits = engine.runner.run(ScheduledBatch([seq], [n]))
            seq.num_computed_tokens += n
            (token,), (lp,) = sampler.sample(logits, [seq])
            seq.append_token(token, lp)
    finally:
        engine.block_manager.free(seq)
    return seq


class Spy:
    """Records every batch the engine's runner computes: [(seq_id, num_tokens)] and its block copies."""

    def __init__(self, engine):
        self.batches: list[list[tuple[int, int]]] = []
        self.copies: list[list[tuple[int, int]]] = []
        self._run = engine.runner.run
        engine.runner.run = self.run

    def run(self, batch: ScheduledBatch):
        self.batches.append([(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_tokens)])
        self.copies.append(list(batch.blocks_to_copy))
        return self._run(batch)


@pytest.fixture
def spy(smol_llm):
    spy = Spy(smol_llm.engine)
    yield spy
    del smol_llm.engine.runner.run  # back to the class's method


def assert_no_refs(llm: LLM) -> None:
    assert_all_blocks_free(llm)
    held = [b for b in llm.engine.block_manager.blocks if b.ref_cnt]
    assert not held, f"blocks still referenced: {held}"


# --- n > 1 against each sample alone ------------------------------------------------------------
@pytest.mark.parametrize("params", [seeded(4, 8), greedy(8, n=3, logprobs=2)], ids=["seeded-n4", "greedy-n3"])
def test_samples_share_one_prefill_and_equal_each_sample_alone(smol_llm, spy, params):
    engine, bs = smol_llm.engine, smol_llm.engine.block_manager.block_size
    prompt = random_prompts([45], seed=20)[0]["prompt_token_ids"]  # 2 full blocks + a shared partial one
    engine.add_request("n", {"prompt_token_ids": prompt}, params, cache_salt=f"cold-{params.seed}")  # no cache hit
    full, outs = 45 // bs, []
    while engine.has_unfinished_requests():
        outs += engine.step()
        seqs = engine.requests["n"].seqs if engine.has_unfinished_requests() else []
        if len(spy.batches) == 1:  # the prefill step: the samples fork and share every prompt block
            assert spy.batches[0] == [(seqs[0].seq_id, 45)], "only the first sample computes the prompt"
            assert all(s.block_table == seqs[0].block_table for s in seqs)
            assert all(engine.block_manager.blocks[b].ref_cnt == params.n for b in seqs[0].block_table)
            partial = seqs[0].block_table[full]
        if len(spy.batches) == 2:  # the first decode: the partial block is copied for all but one sample
            assert sorted(src for src, _ in spy.copies[1]) == [partial] * (params.n - 1)
            assert all(s.block_table[:full] == seqs[0].block_table[:full] for s in seqs)
            assert len({s.block_table[full] for s in seqs}) == params.n
    assert sum(n for batch in spy.batches for _, n in batch) == 45 + params.n * (params.max_tokens - 1)
    final = outs[-1].outputs
    assert [o.index for o in final] == list(range(params.n))
    for i, out in enumerate(final):
        alone = run_alone(engine, prompt, params, index=i)
        assert out.finish_reason == "length" and len(out.token_ids) == params.max_tokens
        if params.greedy:
            assert_same_or_tie(out.token_ids, alone.token_ids[45:], alone.logprobs, f"greedy sample {i} vs alone")
            assert out.cumulative_logprob == pytest.approx(alone.cumulative_logprob, abs=1e-3)
        else:
            assert out.token_ids == alone.output_token_ids, f"seeded sample {i}: shared vs alone"
            assert out.cumulative_logprob is None  # only with logprobs, as in vLLM
        assert out.text == smol_llm.tokenizer.decode(out.token_ids)
    if not params.greedy:
        assert len({tuple(o.token_ids) for o in final}) == params.n, "independent streams differ"
        single = smol_llm.generate({"prompt_token_ids": prompt}, seeded(1, 8))[0].outputs[0]
        assert single.token_ids == final[0].token_ids, "sample 0 equals the same request with n=1"
    assert_no_refs(smol_llm)


@pytest.fixture(scope="module")
def tight_llm(smollm2_dir):
    """16 KV blocks (256 tokens): three requests of 3 samples overflow it."""
    return LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=16 * BLOCK_BYTES, max_model_len=128,
               progress=False)


def test_preempted_forked_samples_recompute_their_own_output(smol_llm, tight_llm):
    # Each sample ends at 50 tokens (4 blocks), a request at 10 blocks with its shared prompt block.
    # top_k=4: a recomputed prefill's logits differ from a decode's in the last bits, which may move
    # an inverse-CDF draw across the tiny intervals of the vocabulary's tail, not across the top 4.
    prompts = random_prompts([30, 28, 31], seed=21)
    params = seeded(3, 20, top_k=4)
    bm, sched = tight_llm.engine.block_manager, tight_llm.engine.scheduler
    for i, prompt in enumerate(prompts):
        tight_llm.engine.add_request(f"p{i}", prompt, params)
    children = [s for i in range(3) for s in tight_llm.engine.requests[f"p{i}"].seqs[1:]]
    before, outs = sched.num_preemptions, {}
    while tight_llm.engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in tight_llm.engine.step() if o.finished}
        assert bm.num_free_blocks + len({b for s in sched.running for b in s.block_table}) == bm.num_blocks
    assert sched.num_preemptions > before and any(s.num_preemptions for s in children), \
        "the workload was meant to preempt forked samples"
    roomy = smol_llm.generate(prompts, params)
    for i, ref in enumerate(roomy):
        got = outs[f"p{i}"].outputs
        assert len({tuple(o.token_ids) for o in ref.outputs}) > 1, "the samples differ"
        assert [o.token_ids for o in got] == [o.token_ids for o in ref.outputs], f"request {i} under preemption"
        assert [o.text for o in got] == [o.text for o in ref.outputs]
    assert_no_refs(tight_llm)


def test_samples_stop_at_their_own_stop_string(smol_llm):
    prompt = "Write one sentence about the sea."
    params = seeded(4, 24, seed=3)
    full = smol_llm.generate(prompt, params)[0].outputs
    stop = "assistant"  # the samples write it at different steps, or never
    stopped = smol_llm.generate(prompt, seeded(4, 24, seed=3, stop=stop))[0].outputs
    lengths = set()
    for i, (f, s) in enumerate(zip(full, stopped)):
        cut = f.text.find(stop)
        if cut < 0:
            assert (s.finish_reason, s.text, s.token_ids) == ("length", f.text, f.token_ids), f"sample {i}"
            continue
        assert s.finish_reason == "stop" and s.text == f.text[:cut], f"sample {i}: {s.text!r}, stop {stop!r}"
        k = len(s.token_ids)
        assert s.token_ids == f.token_ids[:k], "a stopped sample is a prefix of its unstopped run"
        assert stop in smol_llm.tokenizer.decode(f.token_ids[:k]) and stop not in smol_llm.tokenizer.decode(
            f.token_ids[:k - 1]), "it ends at the token that completes the stop string"
        lengths.add(k)
    assert len(lengths) >= 2 and any(s.finish_reason == "length" for s in stopped), \
        "the samples should finish at different steps (the siblings of a finished one go on)"
    assert_no_refs(smol_llm)


def test_abort_before_and_after_the_fork_frees_every_block(smol_llm):
    engine, bm = smol_llm.engine, smol_llm.engine.block_manager
    prompts = random_prompts([40, 35], seed=22)
    engine.add_request("early", prompts[0], seeded(4, 10))
    engine.abort("early")  # before any step: nothing forked, nothing held
    assert_no_refs(smol_llm)
    engine.add_request("late", prompts[0], seeded(4, 10))
    engine.add_request("other", prompts[1], seeded(2, 6))
    for _ in range(3):
        engine.step()
    seqs = engine.requests["late"].seqs
    tables = [b for s in seqs for b in s.block_table]
    assert all(s.num_output_tokens == 3 for s in seqs) and len(set(tables)) < len(tables), "shares blocks"
    engine.abort("late")
    assert all(s.is_finished and s.finish_reason == "abort" and not s.block_table for s in seqs)
    other = engine.requests["other"].seqs
    assert bm.num_blocks - bm.num_free_blocks == len({b for s in other for b in s.block_table})
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["other"] and all(len(o.token_ids) == 6 for o in outs[0].outputs)
    assert_no_refs(smol_llm)


# --- the scheduler's side, no model ------------------------------------------------------------
def test_a_request_is_admitted_only_with_a_place_for_each_sample():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", [1] * 5, SamplingParams(n=3))
    b = Sequence("b", [2] * 5, SamplingParams(n=2))
    c = Sequence("c", [3] * 5, SamplingParams())
    for seq in (a, b, c):
        sched.add(seq)
    assert sched.schedule().seqs == [a], "a takes 3 places of 4 (its samples fork from it); b needs 2"
    assert list(sched.waiting) == [b, c]
    a.num_computed_tokens = 5
    a.append_token(9)
    assert a.num_seats == 1
    sched.finish(a, "stop")
    assert sched.schedule().seqs == [b, c]


@pytest.mark.parametrize("num_blocks", [6, 5])
def test_a_beam_waits_for_a_lagging_sibling_and_makes_room_for_it(num_blocks):
    bm = BlockManager(num_blocks, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    ahead = Sequence("r", [1] * 8, SamplingParams(use_beam_search=True, best_of=2, temperature=0))
    sched.add(ahead)
    assert sched.schedule().num_tokens == [8]
    ahead.num_computed_tokens = 8
    ahead.append_token(5)
    lagging = ahead.fork()  # two beams of 9 tokens sharing 2 blocks
    bm.fork(ahead, lagging)
    sched.add_running(lagging)
    batch = sched.schedule()
    assert batch.seqs == [ahead, lagging] and batch.num_tokens == [1, 1]
    assert bm.num_free_blocks == num_blocks - 4
    ahead.num_computed_tokens += 1  # ahead computed its token and holds its next log-probs;
    sched.preempt(lagging)          # lagging lost its blocks before it did (9 tokens to recompute: 3 blocks)
    batch = sched.schedule()
    assert batch.seqs == [lagging] and batch.num_tokens == [9]
    if num_blocks == 6:  # room for both: the beam with nothing to compute is skipped
        assert sched.running == [ahead, lagging] and ahead.block_table
    else:  # 2 free blocks: the waiting beam gives its blocks up; it has nothing to compute, so it is not queued
        assert sched.running == [lagging] and not sched.waiting
        assert ahead.num_computed_tokens == 0 and not ahead.block_table
