"""BlockManager: ref counts, the free queue, copy-on-write, and leak/double-free checks.

The stateful test drives a BlockManager through long random runs of create / append /
compute / fork / write-into-shared / free and checks every invariant after each step
against naive models: ref counts recounted from the live block tables, and what every KV
slot holds (the salt and token prefix whose last token was written there), so a shared or
copied block that holds the wrong prefix is caught. tests/engine/test_prefix_cache.py runs
the same machine with prefix caching on and an `admit` rule that reuses cached blocks.
"""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams
from cupaged.util import cdiv

PARAMS = SamplingParams()


def make_seq(num_prompt_tokens: int, name: str = "r") -> Sequence:
    return Sequence(name, list(range(1, num_prompt_tokens + 1)), PARAMS)


def free_ids(bm: BlockManager) -> list[int]:
    return [block.block_id for block in bm.free_queue]


# --- stateful property test ----------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """Model: the live sequences, and per sequence the tokens slotted but not yet computed.

    A step of the engine is `append` (append_slots for n tokens) then `compute` (advance
    num_computed_tokens by n); forks happen between steps, so only from a parent with
    nothing pending.
    """

    MAX_LIVE = 10
    CACHING = False

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 8, 16]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=self.CACHING)
        self.live: list[Sequence] = []
        self.pending: dict[int, int] = {}  # seq_id -> tokens slotted, not yet computed
        self.num_created = 0
        self.kv: dict[int, tuple] = {}  # slot -> (salt, token prefix) whose K/V it holds

    # --- helpers ---------------------------------------------------------------------------
    def holders(self) -> Counter:
        """How many live sequences hold each block (the model's ref count)."""
        return Counter(b for seq in self.live for b in seq.block_table)

    def idle(self) -> list[Sequence]:
        return [seq for seq in self.live if self.pending[seq.seq_id] == 0]

    def shared_writers(self) -> list[Sequence]:
        """Idle sequences whose next write lands in a block another sequence holds."""
        count = self.holders()
        out = []
        for seq in self.idle():
            index = seq.num_computed_tokens // self.bm.block_size
            if index < len(seq.block_table) and count[seq.block_table[index]] > 1:
                out.append(seq)
        return out

    def expected_blocks_needed(self, seq: Sequence, n: int) -> int:
        bs = self.bm.block_size
        grow = max(0, cdiv(seq.num_computed_tokens + n, bs) - len(seq.block_table))
        index = seq.num_computed_tokens // bs
        shared = n > 0 and index < len(seq.block_table) and self.holders()[seq.block_table[index]] > 1
        return grow + int(shared)

    def kv_entry(self, seq: Sequence, position: int) -> tuple:
        return seq.cache_salt, tuple(seq.token_ids[:position + 1])

    def new_seq(self, token_ids: list[int], salt: str | None = None) -> Sequence:
        seq = Sequence(f"r{self.num_created}", token_ids, PARAMS, cache_salt=salt)
        self.num_created += 1
        self.live.append(seq)
        self.pending[seq.seq_id] = 0
        return seq

    def try_append(self, seq: Sequence, n: int) -> list[tuple[int, int]] | None:
        """append_slots if can_append allows it, checking the answer either way."""
        bm = self.bm
        needed = self.expected_blocks_needed(seq, n)
        assert bm.blocks_needed(seq, n) == needed
        table_before, free_before = list(seq.block_table), bm.num_free_blocks
        if not bm.can_append(seq, n):
            assert needed > free_before
            with pytest.raises(AssertionError, match="not enough free blocks"):
                bm.append_slots(seq, n)
            assert seq.block_table == table_before and bm.num_free_blocks == free_before
            return None
        assert needed <= free_before
        holders_before = self.holders()
        copies = bm.append_slots(seq, n)
        for src, dst in copies:  # the copy runs before the step
            for i in range(bm.block_size):
                self.kv[dst * bm.block_size + i] = self.kv.get(src * bm.block_size + i)
        assert bm.num_free_blocks == free_before - needed
        index = seq.num_computed_tokens // bm.block_size
        # untouched prefix, appended tail
        assert seq.block_table[:index] == table_before[:index]
        assert len(seq.block_table) == max(len(table_before), cdiv(seq.num_computed_tokens + n, bm.block_size))
        for (src, dst) in copies:
            assert src != dst
            assert holders_before[src] > 1, f"copied unshared block {src}"
            assert seq.block_table[index] == dst and table_before[index] == src
            assert bm.blocks[dst].ref_cnt == 1
            assert bm.blocks[src].ref_cnt == holders_before[src] - 1
        assert len(copies) == int(needed > max(0, cdiv(seq.num_computed_tokens + n, bm.block_size) - len(table_before)))
        self.pending[seq.seq_id] = n
        return copies

    # --- rules -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < self.MAX_LIVE)
    @rule(num_prompt_tokens=st.integers(1, 64))
    def create(self, num_prompt_tokens: int) -> None:
        self.new_seq(list(range(1, num_prompt_tokens + 1)))

    @precondition(lambda self: self.idle())
    @rule(data=st.data(), n=st.integers(0, 40))
    def append(self, data, n: int) -> None:
        seq = data.draw(st.sampled_from(self.idle()), label="seq")
        self.try_append(seq, n)

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def compute(self, data) -> None:
        busy = [seq for seq in self.live if self.pending[seq.seq_id]]
        seq = data.draw(st.sampled_from(busy), label="seq")
        start = seq.num_computed_tokens
        seq.num_computed_tokens += self.pending[seq.seq_id]
        self.pending[seq.seq_id] = 0
        while seq.num_tokens <= seq.num_computed_tokens:  # the step sampled a token
            seq.append_token(7)
        for p in range(start, seq.num_computed_tokens):
            self.kv[self.bm.slot(seq, p)] = self.kv_entry(seq, p)
        self.bm.cache_full_blocks(seq)

    @precondition(lambda self: self.idle() and len(self.live) < self.MAX_LIVE)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self.idle()), label="parent")
        refs_before = {b: self.bm.blocks[b].ref_cnt for b in parent.block_table}
        free_before = self.bm.num_free_blocks
        child = self.new_seq(parent.prompt_token_ids)  # without a salt: fork passes the parent's on
        child.token_ids = list(parent.token_ids)
        self.bm.fork(parent, child)
        assert child.block_table == parent.block_table
        assert child.block_table is not parent.block_table
        assert child.num_computed_tokens == parent.num_computed_tokens
        assert self.bm.num_free_blocks == free_before
        for b, ref in refs_before.items():
            assert self.bm.blocks[b].ref_cnt == ref + 1
        assert child.cache_salt == parent.cache_salt

    @precondition(lambda self: self.shared_writers())
    @rule(data=st.data(), n=st.integers(1, 20))
    def write_shared(self, data, n: int) -> None:
        seq = data.draw(st.sampled_from(self.shared_writers()), label="seq")
        index = seq.num_computed_tokens // self.bm.block_size
        src = seq.block_table[index]
        copies = self.try_append(seq, n)
        if copies is not None:
            assert len(copies) == 1
            (copy_src, dst), = copies
            assert copy_src == src and dst != src
            assert seq.block_table[index] == dst
            assert src not in seq.block_table
            assert any(src in other.block_table for other in self.live if other is not seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq = data.draw(st.sampled_from(self.live), label="seq")
        table = list(seq.block_table)
        self.live.remove(seq)
        del self.pending[seq.seq_id]
        self.bm.free(seq)
        assert seq.block_table == []
        still_held = self.holders()
        in_queue = set(free_ids(self.bm))
        for b in table:
            if still_held[b]:
                assert self.bm.blocks[b].ref_cnt == still_held[b]
            else:
                assert self.bm.blocks[b].ref_cnt == 0 and b in in_queue

    # --- invariants ------------------------------------------------------------------------
    @invariant()
    def ref_counts_match_tables(self) -> None:
        count = self.holders()
        for block in self.bm.blocks:
            assert block.ref_cnt == count[block.block_id], (block, count[block.block_id])

    @invariant()
    def free_queue_is_consistent(self) -> None:
        queue = free_ids(self.bm)
        assert len(queue) == self.bm.num_free_blocks
        assert len(set(queue)) == len(queue), f"duplicate in free queue: {queue}"
        held = set(self.holders())
        assert not held & set(queue), f"held blocks in the free queue: {held & set(queue)}"
        assert all(self.bm.blocks[b].ref_cnt == 0 for b in queue)
        assert len(queue) + len(held) == self.bm.num_blocks, "leaked blocks"
        # the links agree in both directions; held blocks are unlinked
        walk, block = [], self.bm.free_queue._tail.prev
        while block is not self.bm.free_queue._head:
            walk.append(block.block_id)
            block = block.prev
        assert walk[::-1] == queue[len(queue) - self.bm.free_queue.num_linked:]  # after the never-used ids
        for b in held:
            assert self.bm.blocks[b].prev is None and self.bm.blocks[b].next is None

    @invariant()
    def tables_cover_their_tokens(self) -> None:
        bs = self.bm.block_size
        for seq in self.live:
            covered = seq.num_computed_tokens + self.pending[seq.seq_id]
            assert len(seq.block_table) * bs >= covered
            assert len(seq.block_table) == cdiv(covered, bs), "table holds more blocks than it needs"
            assert len(set(seq.block_table)) == len(seq.block_table)


    @invariant()
    def kv_holds_each_prefix(self) -> None:
        """Every computed position of every live sequence reads back its own salt and prefix."""
        for seq in self.live:
            for p in range(seq.num_computed_tokens):
                assert self.kv.get(self.bm.slot(seq, p)) == self.kv_entry(seq, p), (seq, p)


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(max_examples=200, stateful_step_count=100, deadline=None)


# --- unit tests ----------------------------------------------------------------------------
def test_double_free_names_the_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(6)
    bm.append_slots(seq, 6)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table  # a stale table freed a second time
    with pytest.raises(AssertionError, match=rf"double free of block {table[-1]}\b"):
        bm.free(seq)


def test_shared_block_freed_twice_by_one_holder():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = make_seq(4), make_seq(4)
    bm.append_slots(a, 4)
    a.num_computed_tokens = 4  # fork between steps
    bm.fork(a, b)
    block = a.block_table[0]
    assert bm.blocks[block].ref_cnt == 2
    bm.free(a)
    assert bm.blocks[block].ref_cnt == 1 and bm.num_free_blocks == 1
    bm.free(b)
    b.block_table = [block]
    with pytest.raises(AssertionError, match=f"double free of block {block}"):
        bm.free(b)


def test_free_queue_remove_of_held_block_asserts():
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq(2)
    bm.append_slots(seq, 2)
    held = bm.blocks[seq.block_table[0]]
    with pytest.raises(AssertionError, match=f"block {held.block_id} is not free"):
        bm.free_queue.remove(held)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_allocate_all_then_free_all_returns_pool_to_full(block_size):
    num_blocks = 1000
    bm = BlockManager(num_blocks, block_size)
    seqs = [make_seq(block_size) for _ in range(num_blocks)]
    for seq in seqs:
        bm.append_slots(seq, block_size)
    assert bm.num_free_blocks == 0
    assert sorted(b for s in seqs for b in s.block_table) == list(range(num_blocks))
    assert not bm.can_append(make_seq(1), 1)
    for seq in seqs[::2] + seqs[1::2]:  # free out of allocation order
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks
    assert sorted(free_ids(bm)) == list(range(num_blocks))
    assert all(block.ref_cnt == 0 for block in bm.blocks)
    # and the pool is fully usable again, by one sequence
    big = make_seq(num_blocks * block_size)
    bm.append_slots(big, num_blocks * block_size)
    assert bm.num_free_blocks == 0 and sorted(big.block_table) == list(range(num_blocks))


def test_allocation_is_fifo_and_free_pushes_the_tail_in_reverse():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(4), make_seq(2)
    bm.append_slots(a, 4)
    bm.append_slots(b, 2)
    assert a.block_table == [0, 1] and b.block_table == [2]
    bm.free(a)  # tail block first, so the tail is reused last
    assert free_ids(bm) == [3, 4, 5, 1, 0]
    c = make_seq(6)
    bm.append_slots(c, 6)
    assert c.block_table == [3, 4, 5]


def test_append_slots_grows_by_blocks_and_slot_maps_positions():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(5)
    assert bm.blocks_needed(seq, 5) == 2
    assert bm.append_slots(seq, 5) == []
    seq.num_computed_tokens = 5
    assert bm.blocks_needed(seq, 3) == 0  # fills block 1
    bm.append_slots(seq, 3)
    seq.num_computed_tokens = 8
    assert bm.blocks_needed(seq, 1) == 1
    bm.append_slots(seq, 1)
    assert len(seq.block_table) == 3
    for p in range(9):
        assert bm.slot(seq, p) == seq.block_table[p // 4] * 4 + p % 4
    assert bm.blocks_needed(seq, 0) == 0 and bm.append_slots(seq, 0) == []


def test_copy_on_write_of_partly_filled_shared_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    parent, child = make_seq(6), make_seq(6)
    bm.append_slots(parent, 6)
    parent.num_computed_tokens = 6
    bm.fork(parent, child)
    shared = list(parent.block_table)
    # child writes position 6, inside shared block 1: one copy and nothing else
    assert bm.blocks_needed(child, 1) == 1
    copies = bm.append_slots(child, 1)
    assert copies == [(shared[1], child.block_table[1])]
    assert child.block_table[0] == shared[0] and child.block_table[1] != shared[1]
    assert bm.blocks[shared[0]].ref_cnt == 2 and bm.blocks[shared[1]].ref_cnt == 1
    # the parent now owns block 1 alone and writes in place
    assert bm.append_slots(parent, 2) == []
    assert parent.block_table == shared


def test_fork_at_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    parent, child = make_seq(8), make_seq(8)
    bm.append_slots(parent, 8)
    parent.num_computed_tokens = 8
    bm.fork(parent, child)
    assert bm.append_slots(child, 1) == []
    assert child.block_table[:2] == parent.block_table and len(child.block_table) == 3


def test_can_append_counts_the_copy():
    bm = BlockManager(num_blocks=2, block_size=4)
    parent, child = make_seq(6), make_seq(6)
    bm.append_slots(parent, 6)
    parent.num_computed_tokens = 6
    bm.fork(parent, child)
    assert bm.num_free_blocks == 0
    assert bm.blocks_needed(child, 1) == 1 and not bm.can_append(child, 1)
    with pytest.raises(AssertionError, match="not enough free blocks"):
        bm.append_slots(child, 1)


def test_without_room_names_exactly_the_decodes_that_need_append_slots():
    """The scheduler's steady-state check against what append_slots does for each sequence alone:
    full last blocks, a shared partly filled block (copy-on-write) and blocks with room."""
    bm = BlockManager(num_blocks=16, block_size=4, num_host_blocks=2)
    full, room, parent, child = make_seq(8), make_seq(6), make_seq(6), make_seq(6)
    for seq in (full, room, parent):
        bm.append_slots(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    bm.fork(parent, child)
    seqs = [full, room, parent, child]
    needs = [seq for seq in seqs if bm.blocks_needed(seq, 1) > 0]
    assert bm.without_room(seqs) == needs == [full, parent, child]
    bm.host.link(full.block_table[0], 0)  # a host twin: every append goes through append_slots
    assert bm.without_room(seqs) is None
