"""Prefix caching without a model: chained hashes, exact eviction order, stats, admission.

The unit tests spell out the free queue and the hash map after every operation (as vLLM's
tests do). The random tests record, for every KV slot, the (salt, token prefix) whose K/V were
written there; a sequence must read back its own prefix at every position it attends to,
whether its blocks were computed by itself, reused from the cache, shared or copied. They run
the block-manager state machine of test_block_manager.py with caching on, and the real
Scheduler with a fake model.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.prefix_cache import PrefixCacheStats, extend_block_hashes, hash_block
from cupaged.engine.scheduler import Scheduler
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams
from tests.engine.test_block_manager import BlockManagerMachine

PARAMS = SamplingParams()


def make_seq(token_ids: list[int], salt: str | None = None, name: str = "r") -> Sequence:
    return Sequence(name, token_ids, PARAMS, cache_salt=salt)


def free_ids(bm: BlockManager) -> list[int]:
    return [block.block_id for block in bm.free_queue]


def named(bm: BlockManager) -> list[int]:
    """Ids of the blocks in the prefix cache, sorted."""
    return sorted(block.block_id for block in bm.cached_blocks.values())


def run_and_free(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit seq, compute all its tokens in one step, name its full blocks, free it. Returns its table."""
    bm.reuse_cached_prefix(seq)
    bm.append_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    table = list(seq.block_table)
    bm.free(seq)
    return table


# --- hashes -----------------------------------------------------------------------------------
def test_hash_depends_on_tokens_parent_and_salt():
    ids = [5, 6, 7, 8]
    root = hash_block(None, ids)
    assert hash_block(None, list(ids)) == root  # a pure function of its inputs
    assert hash_block(None, [5, 6, 7, 9]) != root
    salted = {salt: hash_block(None, ids, salt) for salt in ("tenant-a", "tenant-b", "")}
    assert len(set(salted.values()) | {root}) == 4, "same tokens, different salts: different hashes"
    child_a, child_b = hash_block(salted["tenant-a"], ids), hash_block(root, ids)
    assert child_a != child_b, "same tokens, different parents: different hashes"
    assert child_b != root, "a first block never hashes like a later block with the same tokens"
    assert hash_block(root, ids, "tenant-a") == child_b, "the salt enters through the first block only"


def test_chain_names_whole_prefixes():
    bs = 4
    a = list(range(10, 22))               # 3 full blocks
    b = a[:8] + [99, 98, 97, 96]          # same first 2 blocks, then different
    ha = extend_block_hashes([], a, bs, 3, None)
    hb = extend_block_hashes([], b, bs, 3, None)
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    assert ha == [hash_block(None, a[:4]), hash_block(ha[0], a[4:8]), hash_block(ha[1], a[8:12])]
    # a block with equal tokens but a different past has a different name
    c = [1, 2, 3, 4] + a[4:8]
    assert extend_block_hashes([], c, bs, 2, None)[1] != ha[1]
    # extending is incremental and never rehashes
    grown = extend_block_hashes(ha[:1], a, bs, 3, None)
    assert grown == ha
    assert extend_block_hashes(ha, a, bs, 2, None) is ha and len(ha) == 3


def test_hashes_are_the_same_in_another_process():
    code = ("from cupaged.engine.prefix_cache import hash_block as h; "
            "print(h(h(None, [1, 2, 3], 's'), [4, 5, 6]).hex())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert runs == {hash_block(hash_block(None, [1, 2, 3], "s"), [4, 5, 6]).hex()}


# --- eviction order ---------------------------------------------------------------------------
def test_freed_blocks_stay_cached_and_the_last_block_is_evicted_first():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(1, 15)))  # 14 tokens: 3 full blocks and a partial one
    assert run_and_free(bm, a) == [0, 1, 2, 3]
    assert named(bm) == [0, 1, 2] and bm.num_free_blocks == 8
    assert free_ids(bm) == [4, 5, 6, 7, 3, 2, 1, 0]  # the tail went in first
    filler = make_seq([500] * 20)  # 5 blocks: the 4 never used, then a's partial block 3
    bm.append_slots(filler, 20)
    assert filler.block_table == [4, 5, 6, 7, 3] and named(bm) == [0, 1, 2]
    bm.append_slots(filler, 21)  # one more block: block 2, a's last full block, loses its name
    assert filler.block_table[-1] == 2 and named(bm) == [0, 1]
    again = make_seq(list(range(1, 15)))
    assert bm.reuse_cached_prefix(again) == 8 and again.block_table == [0, 1]


def test_lru_evicts_the_request_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a, b = make_seq([1, 2, 3, 4, 9]), make_seq([5, 6, 7, 8, 9])
    assert run_and_free(bm, a) == [0, 1, 2]
    assert run_and_free(bm, b) == [3, 2, 1]  # b's third block evicts a's block 1
    assert free_ids(bm) == [0, 1, 2, 3]
    assert named(bm) == [0, 2, 3]  # a: block 0; b: blocks 3, 2
    c = make_seq([70, 71, 72, 73, 74, 75])
    bm.append_slots(c, 4)  # two blocks: a's leftover block 0 goes before b's blocks
    assert c.block_table == [0, 1] and named(bm) == [2, 3]
    assert bm.reuse_cached_prefix(make_seq([5, 6, 7, 8, 9])) == 4


def test_reuse_takes_a_free_block_out_of_the_middle_and_refreeing_makes_it_recent():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a, b = make_seq([1, 2, 3]), make_seq([4, 5, 6])
    run_and_free(bm, a)  # blocks 0, 1
    run_and_free(bm, b)  # blocks 2, 3
    assert free_ids(bm) == [4, 5, 1, 0, 3, 2] and named(bm) == [0, 2]
    again = make_seq([1, 2, 7])
    assert bm.reuse_cached_prefix(again) == 2 and again.block_table == [0]
    assert bm.blocks[0].ref_cnt == 1 and free_ids(bm) == [4, 5, 1, 3, 2]
    bm.free(again)
    assert free_ids(bm) == [4, 5, 1, 3, 2, 0], "a block used again goes to the tail: evicted last"
    assert named(bm) == [0, 2]


def test_a_prefix_computed_twice_is_named_once():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 4])
    for seq in (a, b):  # admitted in the same step: neither finds the other's blocks
        assert bm.reuse_cached_prefix(seq) == 0
        bm.append_slots(seq, 3)
        seq.num_computed_tokens = 3
    for seq in (a, b):
        bm.cache_full_blocks(seq)
    assert named(bm) == [a.block_table[0]] and bm.blocks[b.block_table[0]].block_hash is None
    bm.free(a)
    c = make_seq([1, 2, 5])
    assert bm.reuse_cached_prefix(c) == 2 and c.block_table == [0]


# --- reuse ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens, reused", [(8, 4), (9, 8), (12, 8), (13, 12)])
def test_reuse_leaves_at_least_one_token_to_compute(num_tokens, reused):
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    run_and_free(bm, make_seq(list(range(1, 17))))
    seq = make_seq(list(range(1, num_tokens + 1)))
    assert bm.reuse_cached_prefix(seq) == reused
    assert seq.num_computed_tokens == reused and seq.block_table == list(range(reused // 4))
    assert seq.num_uncomputed_tokens >= 1


def test_a_reused_block_is_never_written():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(1, 10)))
    bm.reuse_cached_prefix(a)
    bm.append_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)  # a still runs: its two full blocks are named while held
    b = make_seq(list(range(1, 9)) + [50, 51])
    assert bm.reuse_cached_prefix(b) == 8 and b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_cnt for i in b.block_table] == [2, 2]
    assert bm.blocks_needed(b, 2) == 1
    assert bm.append_slots(b, 2) == [], "the next token goes into a new block: nothing to copy"
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table


def test_salts_never_share():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    ids = [1, 2, 3, 4, 5]
    run_and_free(bm, make_seq(ids, salt="tenant-a"))
    assert bm.reuse_cached_prefix(make_seq(ids, salt="tenant-b")) == 0
    assert bm.reuse_cached_prefix(make_seq(ids)) == 0
    assert bm.reuse_cached_prefix(make_seq(ids, salt="tenant-a")) == 4


def test_stats_count_tokens_looked_up_and_reused():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    assert bm.prefix_cache_stats() == PrefixCacheStats(0, 0) and bm.prefix_cache_stats().hit_rate == 0.0
    run_and_free(bm, make_seq(list(range(1, 11))))           # 10 looked up, 0 hits
    run_and_free(bm, make_seq(list(range(1, 11)) + [77]))    # 11 looked up, 8 hits
    stats = bm.prefix_cache_stats()
    assert (stats.queries, stats.hits) == (21, 8) == (bm.prefix_cache_queries, bm.prefix_cache_hits)
    assert stats.hit_rate == pytest.approx(8 / 21)
    assert stats - PrefixCacheStats(10, 0) == PrefixCacheStats(11, 8)


def test_caching_off_reuses_nothing_and_names_nothing():
    bm = BlockManager(num_blocks=8, block_size=2)
    run_and_free(bm, make_seq([1, 2, 3, 4, 5]))
    assert named(bm) == [] and all(block.block_hash is None for block in bm.blocks)
    assert bm.reuse_cached_prefix(make_seq([1, 2, 3, 4, 5])) == 0
    assert bm.prefix_cache_stats() == PrefixCacheStats(0, 0)


def test_fork_passes_on_the_salt_and_only_the_hashes_of_computed_blocks():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    parent = make_seq([1, 2, 3, 4, 5, 6, 7], salt="s")
    bm.reuse_cached_prefix(parent)  # hashes the 3 full blocks it might have reused
    assert len(parent.block_hashes) == 3
    bm.append_slots(parent, 4)
    parent.num_computed_tokens = 4  # a first chunk
    bm.cache_full_blocks(parent)
    child = Sequence("r", [1, 2, 3, 4, 5, 9, 7], PARAMS)  # differs after the fork point
    bm.fork(parent, child)
    assert child.cache_salt == "s" and child.num_cached_blocks == 2
    assert child.block_hashes == parent.block_hashes[:2]
    bm.append_slots(child, 2)
    child.num_computed_tokens = 6
    bm.cache_full_blocks(child)
    assert child.block_hashes[2] == hash_block(parent.block_hashes[1], [5, 9]) != parent.block_hashes[2]
    assert bm.blocks[child.block_table[2]].block_hash == child.block_hashes[2]
    assert named(bm) == sorted(child.block_table)


# --- admission --------------------------------------------------------------------------------
def test_admission_counts_free_cached_blocks_as_taken():
    """4 blocks, all free; 3 of them cache the 12-token prefix of a 20-token prompt. Under an
    8-token budget, an 8-token chunk needs 2 of the 4 free blocks, but taking the cached 3 leaves
    1 for the 2 the remaining 8 tokens need: the prompt must wait, holding nothing, and its lookup
    must not be counted until it is admitted."""
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    run_and_free(bm, make_seq(list(range(1, 14))))
    assert named(bm) == [0, 1, 2] and bm.num_free_blocks == 4
    before = bm.prefix_cache_stats()
    seq = make_seq(list(range(1, 13)) + [60] * 8)
    sched.add(seq)
    assert sched.schedule().seqs == []
    assert list(sched.waiting) == [seq] and seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 4 and named(bm) == [0, 1, 2] and bm.prefix_cache_stats() == before
    # with a budget of 4 tokens, the first chunk needs one block: admitted, on top of the cache
    sched.max_num_batched_tokens = 4
    batch = sched.schedule()
    assert batch.seqs == [seq] and batch.num_tokens == [4] and seq.block_table[:3] == [0, 1, 2]
    assert seq.num_computed_tokens == 12 and bm.num_free_blocks == 0
    assert bm.prefix_cache_stats() - before == PrefixCacheStats(20, 12)


# --- the block-manager state machine, caching on ----------------------------------------------
class PrefixCacheMachine(BlockManagerMachine):
    """Every rule of BlockManagerMachine (whose compute names full blocks), plus `admit`:
    a new sequence takes its cached prefix. Checks the names against what the blocks hold."""

    CACHING = True

    def __init__(self):
        super().__init__()
        self.queries = self.hits = 0

    def named_prefixes(self) -> set[tuple]:
        """What the blocks in the prefix cache hold, as the kv entry of their last slot."""
        bs = self.bm.block_size
        return {self.kv.get(block.block_id * bs + bs - 1) for block in self.bm.cached_blocks.values()}

    @precondition(lambda self: len(self.live) < self.MAX_LIVE)
    @rule(shared=st.integers(0, 40), tail=st.lists(st.integers(1, 2), max_size=12),
          salt=st.sampled_from([None, "a"]))
    def admit(self, shared: int, tail: list[int], salt: str | None) -> None:
        """A new sequence (a prefix of 1, 2, 3... then a random tail) takes its cached prefix."""
        seq = self.new_seq(list(range(1, shared + 1)) + tail or [1], salt)
        bs, free_before = self.bm.block_size, self.bm.num_free_blocks
        reused = self.bm.reuse_cached_prefix(seq)
        assert reused == seq.num_computed_tokens == len(seq.block_table) * bs
        assert reused <= seq.num_tokens - 1
        self.queries += seq.num_tokens
        self.hits += reused
        assert self.bm.num_free_blocks == free_before - sum(self.holders()[b] == 1 for b in seq.block_table)
        # the match is the longest: the next block's prefix is in no named block (and that the
        # reused blocks hold this sequence's prefix is the invariant kv_holds_each_prefix)
        k = len(seq.block_table) + 1
        if k * bs <= seq.num_tokens - 1:
            assert self.kv_entry(seq, k * bs - 1) not in self.named_prefixes()

    @invariant()
    def cache_names_match_contents(self) -> None:
        bm, bs = self.bm, self.bm.block_size
        named = [block for block in bm.blocks if block.block_hash is not None]
        assert sorted(b.block_id for b in bm.cached_blocks.values()) == sorted(b.block_id for b in named), \
            "the map and the blocks' names disagree (or one block has two entries)"
        for block_hash, block in bm.cached_blocks.items():
            assert block.block_hash == block_hash
            # a named block is full, and its name is the chain hash of the prefix it holds
            salt, prefix = self.kv[block.block_id * bs + bs - 1]
            assert len(prefix) % bs == 0
            assert extend_block_hashes([], prefix, bs, len(prefix) // bs, salt)[-1] == block_hash
        assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (self.queries, self.hits)


TestPrefixCacheStateful = PrefixCacheMachine.TestCase
TestPrefixCacheStateful.settings = settings(max_examples=200, stateful_step_count=100, deadline=None)


# --- random workloads through the scheduler ---------------------------------------------------
class FakeRun:
    """The engine's step without a model: KV slots hold (salt, prefix) instead of K/V."""

    def __init__(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int = 4):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
        self.sched = Scheduler(self.bm, max_num_seqs, budget)
        self.kv: dict[int, tuple] = {}

    def step(self) -> None:
        bm, batch = self.bm, self.sched.schedule()
        for src, dst in batch.blocks_to_copy:
            for i in range(bm.block_size):
                self.kv[dst * bm.block_size + i] = self.kv.get(src * bm.block_size + i)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            for p in range(seq.num_computed_tokens):  # what the step attends to is this sequence's past
                assert self.kv.get(bm.slot(seq, p)) == (seq.cache_salt, tuple(seq.token_ids[:p + 1])), (seq, p)
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.kv[bm.slot(seq, p)] = (seq.cache_salt, tuple(seq.token_ids[:p + 1]))
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            sample = batch.samples(i)
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
            if sample:
                seq.append_token(1 + sum(seq.token_ids) % 3)  # depends on the prefix, like a model
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.finish(seq, "length")
        self.check_pool()

    def check_pool(self) -> None:
        bm = self.bm
        held = Counter(b for seq in self.sched.running for b in seq.block_table)
        assert len(held) + bm.num_free_blocks == bm.num_blocks, "leaked blocks"
        for block in bm.blocks:
            assert block.ref_cnt == held[block.block_id], block
        for block_hash, block in bm.cached_blocks.items():
            assert block.block_hash == block_hash
        assert len({b.block_id for b in bm.cached_blocks.values()}) == len(bm.cached_blocks)
        assert sum(b.block_hash is not None for b in bm.blocks) == len(bm.cached_blocks)


@settings(max_examples=150, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4]), budget=st.integers(1, 24), spare=st.integers(0, 8),
       prefix=st.lists(st.integers(1, 3), max_size=20),
       requests=st.lists(st.tuples(st.lists(st.integers(1, 3), min_size=1, max_size=10),
                                   st.sampled_from([None, "a", "b"]), st.integers(1, 6), st.integers(0, 10)),
                         min_size=1, max_size=10))
def test_random_shared_prefix_workloads(block_size, budget, spare, prefix, requests):
    """(suffix, salt, max_tokens, arrival step) after a common prefix; small pools force
    preemption and eviction, small budgets chunk the prefills."""
    longest = max(len(prefix) + len(s) + m for s, _, m, _ in requests)
    run = FakeRun(-(-longest // block_size) + spare, block_size, budget)
    arrivals = sorted(requests, key=lambda r: r[3])
    seqs, step = [], 0
    while arrivals or run.sched.has_unfinished():
        while arrivals and arrivals[0][3] <= step:
            suffix, salt, max_tokens, _ = arrivals.pop(0)
            seq = Sequence(f"r{len(seqs)}", prefix + suffix, SamplingParams(max_tokens=max_tokens), cache_salt=salt)
            run.sched.add(seq)
            seqs.append(seq)
        run.step()
        step += 1
        assert step < 3_000, "no progress"
    assert all(s.num_output_tokens == s.params.max_tokens and s.block_table == [] for s in seqs)
    assert run.bm.num_free_blocks == run.bm.num_blocks
    stats = run.bm.prefix_cache_stats()
    assert 0 <= stats.hits <= stats.queries


def test_a_preempted_sequence_resumes_from_its_own_cached_blocks():
    """5 blocks of 4. a and b (7-token prompts, 6 outputs) hold 2 blocks each; at position 8
    a takes the last free block and b is preempted with 2 named blocks. a never needs another
    block, so b's blocks survive in the free queue and b resumes on them when a finishes."""
    run = FakeRun(num_blocks=5, block_size=4, budget=64)
    a = Sequence("a", list(range(1, 8)), SamplingParams(max_tokens=6))
    b = Sequence("b", list(range(20, 27)), SamplingParams(max_tokens=6))
    run.sched.add(a)
    run.sched.add(b)
    for _ in range(3):
        run.step()
    assert run.sched.num_preemptions == 1 and list(run.sched.waiting) == [b] and b.num_tokens == 9
    before = run.bm.prefix_cache_stats()
    while b in run.sched.waiting:
        run.step()
    assert a.is_finished
    assert run.bm.prefix_cache_stats() - before == PrefixCacheStats(9, 8), "both full blocks reused"
    while run.sched.has_unfinished():
        run.step()
    assert b.num_output_tokens == 6
