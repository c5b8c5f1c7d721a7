"""Scheduler: continuous batching, chunked prefill, preemption by recompute, finish.

No model: `FakeEngine.step` does what LLMEngine.step does with the batch (advance
num_computed_tokens by the scheduled counts, append a fake token where `samples(i)`,
finish at max_tokens) and checks the scheduler's promises on every step.
"""
from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.scheduler import ScheduledBatch, Scheduler
from cupaged.engine.sequence import Sequence, SequenceStatus
from cupaged.sampling_params import SamplingParams
from cupaged.util import cdiv


class FakeEngine:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked: bool = True):
        self.bm = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill=chunked)
        self.preempted: list[list[Sequence]] = []  # per step
        self.samples: list[bool] = []  # the last step's batch.samples(i)
        self.finished: list[Sequence] = []
        self.num_added = 0

    def add(self, num_prompt_tokens: int, max_tokens: int = 4) -> Sequence:
        seq = Sequence(f"r{self.num_added}", [100 + self.num_added] * num_prompt_tokens,
                       SamplingParams(max_tokens=max_tokens))
        self.num_added += 1
        self.sched.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        sched, bm = self.sched, self.bm
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        outputs_before = {seq.seq_id: seq.output_token_ids for seq in running_before}
        decoding = [s for s in running_before if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in running_before if s.num_uncomputed_tokens > 1]
        batch = sched.schedule()

        # limits
        budget = sched.max_num_batched_tokens
        assert len(batch.seqs) == len(batch.num_tokens)
        assert len(batch.seqs) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
        # decodes first, then running prefills' chunks, each in running order, then newcomers from waiting
        old = [s for s in batch.seqs if s in running_before]
        assert old == [s for s in decoding + prefilling if s in old]
        assert batch.seqs[:len(old)] == old
        new = batch.seqs[len(old):]
        assert new == waiting_before[:len(new)]
        new_tokens = batch.num_tokens[len(old):]
        if sched.enable_chunked_prefill:
            assert batch.total_tokens <= budget
        else:  # a prompt joins whole; only the step's first may take it past the budget
            assert all(n == s.num_uncomputed_tokens for s, n in zip(new, new_tokens))
            assert batch.total_tokens <= budget or (len(new) == 1 and batch.total_tokens - new_tokens[0] < budget)
        left_out = [s for s in sched.running if s not in batch.seqs]
        if left_out:  # for budget, or a prefill chunk that waits for blocks (then nobody is admitted)
            stalled = any(s.num_uncomputed_tokens > 1 for s in left_out)
            assert batch.total_tokens >= budget or (stalled and not new)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            assert 0 < n <= seq.num_uncomputed_tokens
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) == cdiv(seq.num_computed_tokens + n, bm.block_size)
        # preemption: the newest running sequences, by recompute, to the front of waiting
        preempted = [s for s in running_before if s not in sched.running]
        assert preempted == running_before[len(running_before) - len(preempted):]
        if preempted:
            assert len(old) == len(batch.seqs), "no newcomer joins in a step that preempts"
            assert list(sched.waiting)[:len(preempted)] == preempted
        for seq in preempted:
            assert seq.status is SequenceStatus.WAITING
            assert seq.num_computed_tokens == 0 and seq.block_table == []
            assert seq.output_token_ids == outputs_before[seq.seq_id]
        for seq in sched.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        self.preempted.append(preempted)
        self.check_blocks()

        # what the engine does with the batch
        self.samples = [batch.samples(i) for i in range(len(batch.seqs))]  # before advancing
        sampled = [seq for seq, sample in zip(batch.seqs, self.samples) if sample]
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
        for seq in sampled:
            assert seq.num_computed_tokens == seq.num_tokens
            seq.append_token(seq.num_tokens)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
                self.finished.append(seq)
        self.check_blocks()
        return batch

    def check_blocks(self) -> None:
        held = Counter(b for seq in self.sched.running for b in seq.block_table)
        assert len(held) + self.bm.num_free_blocks == self.bm.num_blocks, "leaked blocks"
        for block in self.bm.blocks:
            assert block.ref_cnt == held[block.block_id]

    def run(self, max_steps: int = 10_000) -> list[ScheduledBatch]:
        batches = []
        while self.sched.has_unfinished():
            batches.append(self.step())
            assert len(batches) < max_steps, "no progress"
        return batches


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in zip(batch.seqs, batch.num_tokens)]


# --- continuous batching -------------------------------------------------------------------
def test_new_request_joins_the_running_batch_at_the_next_step():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    eng.add(5, max_tokens=10)
    assert plan(eng.step()) == [("r0", 5)]
    assert plan(eng.step()) == [("r0", 1)]
    eng.add(7)
    assert plan(eng.step()) == [("r0", 1), ("r1", 7)]
    eng.add(3)
    assert plan(eng.step()) == [("r0", 1), ("r1", 1), ("r2", 3)]


def test_step_respects_max_num_seqs():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [eng.add(3, max_tokens=2) for _ in range(5)]
    assert plan(eng.step()) == [("r0", 3), ("r1", 3)]
    assert list(eng.sched.waiting) == seqs[2:]
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]  # both finish here
    assert eng.finished == seqs[:2]
    assert plan(eng.step()) == [("r2", 3), ("r3", 3)]
    eng.run()
    assert all(seq.num_output_tokens == 2 for seq in seqs)


def test_step_respects_the_token_budget():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    eng.add(4)
    eng.add(4)
    eng.add(4)
    assert plan(eng.step()) == [("r0", 4), ("r1", 4), ("r2", 2)]  # r2's prompt is chunked
    assert plan(eng.step()) == [("r0", 1), ("r1", 1), ("r2", 2)]


def test_running_decodes_are_scheduled_before_waiting_prefills():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=2)
    eng.add(1, max_tokens=3)
    eng.add(1, max_tokens=3)
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]
    late = eng.add(1)
    # the decodes use the whole budget: the waiting prefill gets nothing
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]
    assert list(eng.sched.waiting) == [late]
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]  # both finish
    assert plan(eng.step()) == [("r2", 1)]


def test_long_prompt_is_prefilled_in_chunks():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    seq = eng.add(21, max_tokens=2)
    chunks, samples = [], []
    while not seq.is_finished:
        batch = eng.step()
        chunks.append(batch.num_tokens[0])
        samples.append(eng.samples[0])
    assert chunks == [8, 8, 5, 1]
    assert samples == [False, False, True, True]
    assert seq.num_output_tokens == 2


def test_chunked_prefill_shares_the_budget_with_decodes():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    eng.add(2, max_tokens=20)
    eng.step()
    long = eng.add(20, max_tokens=1)
    seen = []
    while not long.is_finished:
        batch = eng.step()
        i = batch.seqs.index(long)
        assert plan(batch)[0] == ("r0", 1)
        seen.append((batch.num_tokens[i], eng.samples[i]))
    assert seen == [(7, False), (7, False), (6, True)]


def test_decodes_are_scheduled_before_a_running_prefill_earlier_in_running():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    eng.add(2, max_tokens=20)
    eng.step()
    eng.add(20, max_tokens=1)
    assert plan(eng.step()) == [("r0", 1), ("r1", 7)]
    # Put the prefill first in `running`: served in running order it would take the whole
    # budget (8 of its 13 tokens) and the stream would stall for a step.
    eng.sched.running.reverse()
    assert plan(eng.step()) == [("r0", 1), ("r1", 7)]
    assert plan(eng.step()) == [("r0", 1), ("r1", 6)]


def test_a_prefill_chunk_waiting_for_blocks_is_not_overtaken():
    # 6 blocks of 4. The prefill (first in running) needs a fifth block while the pool is
    # full and the only victim is a decode already scheduled: the chunk waits, nobody is
    # admitted past it, and it resumes once the stream frees its blocks.
    eng = FakeEngine(num_blocks=6, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    stream = eng.add(3, max_tokens=20)
    eng.step()
    eng.step()
    prompt = eng.add(20, max_tokens=2)
    assert plan(eng.step()) == [("r0", 1), ("r1", 15)] and eng.bm.num_free_blocks == 0
    eng.sched.running.reverse()
    late = eng.add(1)
    for _ in range(3):
        assert plan(eng.step()) == [("r0", 1)]  # the stream's third block still has room
        assert list(eng.sched.waiting) == [late]
    assert plan(eng.step()) == [("r1", 5)]  # the stream needed a block: it was the newest, so preempted
    assert eng.preempted[-1] == [stream]
    eng.run()
    assert [s.num_output_tokens for s in (stream, prompt, late)] == [20, 2, 4]


def test_without_chunking_a_prompt_joins_whole():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8, chunked=False)
    eng.add(2, max_tokens=10)
    eng.add(2, max_tokens=10)
    assert plan(eng.step()) == [("r0", 2), ("r1", 2)]
    eng.add(21, max_tokens=2)
    eng.add(3)
    # the long prompt is the step's first: it joins whole, past the budget, and the one after waits
    assert plan(eng.step()) == [("r0", 1), ("r1", 1), ("r2", 21)]
    assert plan(eng.step()) == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 3)]


def test_without_chunking_a_prompt_waits_for_room_rather_than_split():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=8, chunked=False)
    eng.add(5, max_tokens=3)
    eng.add(5, max_tokens=3)
    assert plan(eng.step()) == [("r0", 5)]  # chunked, r1 would take 3 tokens here
    assert plan(eng.step()) == [("r0", 1), ("r1", 5)]


# --- preemption ----------------------------------------------------------------------------
def test_newest_running_sequence_is_preempted_by_recompute_and_resumes():
    # 4 blocks of 4 tokens. Two 7-token prompts fill all 4 blocks; at position 8 the
    # oldest needs a fifth block, so the newest is preempted.
    eng = FakeEngine(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a = eng.add(7, max_tokens=6)
    b = eng.add(7, max_tokens=4)
    assert plan(eng.step()) == [("r0", 7), ("r1", 7)]
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]
    assert eng.bm.num_free_blocks == 0
    b_out = b.output_token_ids
    assert len(b_out) == 2

    assert plan(eng.step()) == [("r0", 1)]
    assert eng.preempted[-1] == [b] and eng.sched.num_preemptions == 1 and b.num_preemptions == 1
    assert list(eng.sched.waiting) == [b] and eng.sched.running == [a]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.status is SequenceStatus.WAITING
    assert b.output_token_ids == b_out
    assert eng.bm.num_free_blocks == 1  # b's two blocks came back, a took one

    # b needs 3 blocks for its 9 tokens; it waits until a finishes
    while not a.is_finished:
        assert plan(eng.step()) == [("r0", 1)]
    assert a.num_output_tokens == 6
    batch = eng.step()
    assert plan(batch) == [("r1", 9)] and eng.samples == [True]  # prompt + kept output, recomputed
    eng.run()
    assert b.num_output_tokens == 4 and b.output_token_ids[:2] == b_out
    assert eng.bm.num_free_blocks == eng.bm.num_blocks


def test_preemption_takes_the_newest_first_and_keeps_waiting_order():
    eng = FakeEngine(num_blocks=3, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = eng.add(2, max_tokens=3), eng.add(2, max_tokens=3), eng.add(2, max_tokens=3)
    late = eng.add(1)
    assert plan(eng.step()) == [("r0", 2), ("r1", 2), ("r2", 2)]
    # every sequence now needs a new block; only a can have one
    assert plan(eng.step()) == [("r0", 1)]
    assert eng.preempted[-1] == [b, c]
    assert list(eng.sched.waiting) == [b, c, late]
    eng.run()
    assert all(s.num_output_tokens == 3 for s in (a, b, c))


def test_a_step_that_preempts_admits_no_waiting_sequence():
    # the victim is the sequence being scheduled; its own freed block would fit a chunk
    eng = FakeEngine(num_blocks=3, block_size=4, max_num_seqs=8, max_num_batched_tokens=4)
    a = eng.add(4, max_tokens=6)
    b = eng.add(4, max_tokens=6)
    assert plan(eng.step()) == [("r0", 4)]
    assert plan(eng.step()) == [("r0", 1), ("r1", 3)]
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]
    assert eng.bm.num_free_blocks == 0
    assert plan(eng.step()) == [("r0", 1)]  # b needs a block: b is preempted, not re-admitted
    assert eng.preempted[-1] == [b] and list(eng.sched.waiting) == [b]
    assert eng.sched.running == [a]
    eng.run()
    assert a.num_output_tokens == b.num_output_tokens == 6


# --- finish --------------------------------------------------------------------------------
def test_finish_frees_blocks_of_a_running_sequence():
    eng = FakeEngine(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = eng.add(6), eng.add(3)
    eng.step()
    assert eng.bm.num_free_blocks == 5
    eng.sched.finish(a, "abort")
    assert a.is_finished and a.finish_reason == "abort" and a.block_table == []
    assert eng.sched.running == [b] and eng.bm.num_free_blocks == 7
    eng.check_blocks()


def test_finish_removes_a_waiting_sequence():
    eng = FakeEngine(num_blocks=8, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = eng.add(6), eng.add(3)
    eng.step()
    assert list(eng.sched.waiting) == [b]
    eng.sched.finish(b, "abort")
    assert b.is_finished and not eng.sched.waiting and eng.sched.running == [a]
    eng.sched.finish(a, "stop")
    assert not eng.sched.has_unfinished() and eng.bm.num_free_blocks == 8


def test_finish_of_a_preempted_sequence():
    eng = FakeEngine(num_blocks=3, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    eng.add(2, max_tokens=3)
    b = eng.add(2, max_tokens=3)
    eng.add(2, max_tokens=3)
    eng.step()
    eng.step()
    assert b in eng.sched.waiting and b.block_table == []
    eng.sched.finish(b, "abort")
    assert b not in eng.sched.waiting and b.is_finished
    eng.check_blocks()
    eng.run()
    assert eng.bm.num_free_blocks == eng.bm.num_blocks


def run_arrivals(eng, requests) -> list:
    """Drive eng (add / step / sched) through (prompt, max_tokens, arrival step) requests until all
    finish; returns their sequences in arrival order. Also used by test_scheduler_swap."""
    arrivals = sorted(((t, p, m) for p, m, t in requests), key=lambda r: r[0])
    seqs, step = [], 0
    while arrivals or eng.sched.has_unfinished():
        while arrivals and arrivals[0][0] <= step:
            _, p, m = arrivals.pop(0)
            seqs.append(eng.add(p, max_tokens=m))
        eng.step()
        step += 1
        assert step < 5_000, "no progress"
    return seqs


# --- random workloads ----------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 48),
    spare_blocks=st.integers(0, 12),
    requests=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 15)),
                      min_size=1, max_size=12),
    chunked=st.booleans(),
)
def test_random_workloads_finish_within_limits(block_size, max_num_seqs, budget, spare_blocks, requests, chunked):
    """(prompt, max_tokens, arrival step) requests; the pool always fits the longest one. Nobody starves."""
    longest = max(p + m - 1 for p, m, _ in requests)
    eng = FakeEngine(cdiv(longest, block_size) + spare_blocks, block_size, max_num_seqs, budget, chunked)
    seqs = run_arrivals(eng, requests)
    assert [s.num_output_tokens for s in seqs] == [s.params.max_tokens for s in seqs]
    assert all(s.is_finished and s.block_table == [] for s in seqs)
    assert eng.bm.num_free_blocks == eng.bm.num_blocks
