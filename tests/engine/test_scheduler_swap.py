"""Scheduler with preemption_mode "swap": victims go to host memory and resume where they stopped.

No model: `KVEngine` does what LLMEngine + ModelRunner do with a batch, on a stand-in KV cache
that stores token ids (device and host pools as [blocks, block_size] arrays). It moves blocks in
the runner's order (swap-outs, swap-ins, copies), checks that every scheduled sequence finds its
whole context in its blocks, then writes the new tokens. A swap-out that ran after its device
blocks were reused, a swap-in that missed a block, or a resume that lost its place shows up as a
wrong token id.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.scheduler import ScheduledBatch, Scheduler
from cupaged.engine.sequence import Sequence, SequenceStatus
from cupaged.sampling_params import SamplingParams

from tests.engine.test_scheduler import run_arrivals


class KVEngine:
    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 64):
        self.bm = BlockManager(num_blocks, block_size, num_host_blocks)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, preemption_mode="swap")
        self.bs = block_size
        self.device = np.full((num_blocks, block_size), -1, dtype=np.int64)      # [NB, BS] token ids
        self.host = np.full((num_host_blocks, block_size), -1, dtype=np.int64)   # [NH, BS]
        self.num_added = 0
        self.finished: list[Sequence] = []

    def add(self, num_prompt_tokens: int, max_tokens: int = 4) -> Sequence:
        """Token ids are unique per request and position: 1000 * request + position."""
        r = self.num_added
        seq = Sequence(f"r{r}", [1000 * r + p for p in range(num_prompt_tokens)], SamplingParams(max_tokens=max_tokens))
        self.num_added += 1
        self.sched.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        sched = self.sched
        computed_before = {s.seq_id: s.num_computed_tokens for s in [*sched.running, *sched.swapped]}
        batch = sched.schedule()
        assert not (batch.blocks_to_swap_out and batch.blocks_to_swap_in), "a step that preempts swaps nothing in"
        for seq in sched.swapped:  # swapped sequences keep their place and hold host blocks only
            assert seq.status is SequenceStatus.SWAPPED and not seq.block_table
            assert seq.num_computed_tokens == computed_before[seq.seq_id]
            assert len(seq.host_block_table) == -(-seq.num_computed_tokens // self.bs)
        self.run(batch)
        self.check_blocks()
        return batch

    def run(self, batch: ScheduledBatch) -> None:
        """The runner's order, then each sequence's context check, then the KV write and the sampler."""
        for d, h in batch.blocks_to_swap_out:
            self.host[h] = self.device[d]
        for h, d in batch.blocks_to_swap_in:
            self.device[d] = self.host[h]
        for src, dst in batch.blocks_to_copy:
            self.device[dst] = self.device[src]
        for seq, n in zip(batch.seqs, batch.num_tokens):
            assert self.context(seq) == seq.token_ids[:seq.num_computed_tokens], f"{seq} lost its KV"
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.device[seq.block_table[p // self.bs], p % self.bs] = seq.token_ids[p]
        samples = [batch.samples(i) for i in range(len(batch.seqs))]
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
        for seq, sample in zip(batch.seqs, samples):
            if sample:
                seq.append_token(1000 * int(seq.request_id[1:]) + seq.num_tokens)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.finish(seq, "length")
                    self.finished.append(seq)

    def context(self, seq: Sequence) -> list[int]:
        return [int(self.device[seq.block_table[p // self.bs], p % self.bs]) for p in range(seq.num_computed_tokens)]

    def check_blocks(self) -> None:
        bm = self.bm
        device = Counter(b for s in self.sched.running for b in s.block_table)
        host = Counter(h for s in self.sched.swapped for h in s.host_block_table)
        assert [b.ref_cnt for b in bm.blocks] == [device[i] for i in range(bm.num_blocks)]
        assert bm.host.ref_cnt == [host[i] for i in range(bm.host.num_blocks)]
        assert len(device) + bm.num_free_blocks == bm.num_blocks, "leaked device blocks"
        assert len(host) + bm.host.num_free_blocks == bm.host.num_blocks, "leaked host blocks"

    def run_all(self, max_steps: int = 5_000) -> None:
        steps = 0
        while self.sched.has_unfinished():
            self.step()
            steps += 1
            assert steps < max_steps, "no progress"


def plan(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in zip(batch.seqs, batch.num_tokens)]


def test_victim_is_swapped_out_and_resumes_where_it_stopped():
    # 4 blocks of 4 tokens; two 7-token prompts fill them, and at position 8 a needs a fifth block
    eng = KVEngine(num_blocks=4, block_size=4, num_host_blocks=8)
    a = eng.add(7, max_tokens=6)
    b = eng.add(7, max_tokens=4)
    assert plan(eng.step()) == [("r0", 7), ("r1", 7)]
    assert plan(eng.step()) == [("r0", 1), ("r1", 1)]
    b_blocks = list(b.block_table)

    batch = eng.step()
    assert plan(batch) == [("r0", 1)]
    assert batch.blocks_to_swap_out == list(zip(b_blocks, [0, 1]))
    assert a.block_table[2] in b_blocks, "a's new block is one b just gave up: the swap-out runs first"
    assert list(eng.sched.swapped) == [b] and b.status is SequenceStatus.SWAPPED
    assert b.num_computed_tokens == 8 and b.host_block_table == [0, 1] and b.num_preemptions == 1
    assert eng.sched.num_preemptions == eng.sched.num_swap_outs == 1 and not eng.sched.waiting

    while not a.is_finished:  # b needs 2 blocks back + 1 for token 8; only 1 is free until a finishes
        assert plan(eng.step()) == [("r0", 1)]
    batch = eng.step()
    assert plan(batch) == [("r1", 1)], "b resumes with its next token: nothing is recomputed"
    assert [h for h, _ in batch.blocks_to_swap_in] == [0, 1] and eng.sched.num_swap_ins == 1
    eng.run_all()
    assert b.num_output_tokens == 4
    assert eng.bm.num_free_blocks == 4 and eng.bm.host.num_free_blocks == 8


def test_full_swap_space_falls_back_to_recompute(caplog):
    eng = KVEngine(num_blocks=4, block_size=4, num_host_blocks=1)  # b needs 2 host blocks
    eng.add(7, max_tokens=6)
    b = eng.add(7, max_tokens=4)
    eng.step()
    eng.step()
    with caplog.at_level(logging.INFO, logger="cupaged.engine.scheduler"):
        batch = eng.step()
    assert "falling back to recompute" in caplog.text
    assert not batch.blocks_to_swap_out and list(eng.sched.waiting) == [b] and not eng.sched.swapped
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert eng.sched.num_preemptions == 1 and eng.sched.num_swap_outs == 0
    eng.run_all()
    assert b.num_output_tokens == 4 and eng.bm.host.num_free_blocks == 1


def test_swapped_sequences_come_back_before_waiting_ones_join():
    eng = KVEngine(num_blocks=4, block_size=4, num_host_blocks=8)
    a = eng.add(7, max_tokens=3)
    b = eng.add(7, max_tokens=4)
    eng.step()
    eng.step()
    eng.step()  # b is swapped out
    late = eng.add(1, max_tokens=1)  # would fit in the one free block
    while b in eng.sched.swapped:
        batch = eng.step()
        if b in eng.sched.swapped:
            assert late not in batch.seqs, "a newcomer must not overtake a swapped-out sequence"
    assert a.is_finished
    assert plan(batch) == [("r1", 1), ("r2", 1)], "b comes back first; the newcomer may join behind it"
    eng.run_all()
    assert late.num_output_tokens == 1


def test_abort_while_swapped_frees_its_host_blocks():
    eng = KVEngine(num_blocks=4, block_size=4, num_host_blocks=8)
    a = eng.add(7, max_tokens=6)
    b = eng.add(7, max_tokens=4)
    for _ in range(3):
        eng.step()
    assert b in eng.sched.swapped and eng.bm.host.num_free_blocks == 6
    eng.sched.finish(b, "abort")
    assert b.is_finished and not eng.sched.swapped and b.host_block_table == []
    assert eng.bm.host.num_free_blocks == 8 and eng.bm.host.twins() == {}
    eng.run_all()
    assert a.num_output_tokens == 6
    assert eng.bm.num_free_blocks == 4


def test_several_victims_come_back_oldest_first():
    eng = KVEngine(num_blocks=3, block_size=2, num_host_blocks=8)
    a, b, c = (eng.add(2, max_tokens=3) for _ in range(3))
    assert plan(eng.step()) == [("r0", 2), ("r1", 2), ("r2", 2)]
    assert plan(eng.step()) == [("r0", 1)]  # every sequence needs a block; only a gets one
    assert list(eng.sched.swapped) == [b, c]
    eng.run_all()
    assert all(s.num_output_tokens == 3 for s in (a, b, c))
    assert eng.sched.num_swap_ins == eng.sched.num_swap_outs >= 2


@settings(max_examples=120, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 32),
    spare_blocks=st.integers(0, 8),
    num_host_blocks=st.integers(0, 24),
    requests=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 10), st.integers(0, 12)), min_size=1, max_size=10),
)
def test_random_workloads_with_swap_finish_with_both_pools_free(block_size, max_num_seqs, budget, spare_blocks,
                                                                num_host_blocks, requests):
    """(prompt, max_tokens, arrival step) requests; the device pool always fits the longest one."""
    longest = max(p + m - 1 for p, m, _ in requests)
    eng = KVEngine(-(-longest // block_size) + spare_blocks, block_size, num_host_blocks, max_num_seqs, budget)
    seqs = run_arrivals(eng, requests)
    event(f"swapped out: {eng.sched.num_swap_outs > 0}")
    event(f"preempted by recompute: {eng.sched.num_preemptions > eng.sched.num_swap_outs}")
    assert [s.num_output_tokens for s in seqs] == [s.params.max_tokens for s in seqs]
    assert eng.sched.num_swap_ins == eng.sched.num_swap_outs
    assert eng.bm.num_free_blocks == eng.bm.num_blocks and eng.bm.host.num_free_blocks == num_host_blocks
