"""Swap accounting: the host block pool and BlockManager.swap_out / swap_in.

The stateful test models the *data*: each block of both pools holds the token ids written into
it, moved as the runner moves blocks, and a version that changes on every write. After each rule:
each sequence finds its tokens in its blocks (device or host), ref counts equal holders in both
pools, nothing leaks, every twin link joins two blocks of one version, and no two held blocks of a
pool hold one version (shared blocks stay shared)."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence
from cupaged.engine.swap import HostBlockPool
from cupaged.sampling_params import SamplingParams
from cupaged.util import cdiv

PARAMS = SamplingParams()


def computed_seq(bm: BlockManager, num_tokens: int, name: str = "r") -> Sequence:
    """A sequence whose num_tokens prompt tokens are slotted and computed."""
    seq = Sequence(name, list(range(1, num_tokens + 1)), PARAMS)
    bm.append_slots(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    return seq


def forked(bm: BlockManager, parent: Sequence) -> Sequence:
    child = Sequence(parent.request_id, parent.token_ids, PARAMS)
    bm.fork(parent, child)
    return child


# --- the host pool -------------------------------------------------------------------------
def expected_run(free: list[int], n: int) -> list[int]:
    """The naive rule: the lowest id that starts n free consecutive ids, else the n lowest free ids."""
    free_set = set(free)
    for start in sorted(free):
        if all(start + j in free_set for j in range(n)):
            return list(range(start, start + n))
    return sorted(free)[:n]


def test_host_pool_hands_out_the_lowest_run_of_consecutive_ids():
    pool = HostBlockPool(10)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.decref(1)
    pool.decref(3)
    assert pool.free_ids() == [1, 3, 5, 6, 7, 8, 9]
    assert pool.allocate(2) == [5, 6], "1 and 3 are isolated"
    assert pool.allocate(1) == [1]
    assert pool.allocate(3) == [7, 8, 9]
    pool.decref(0)
    assert pool.allocate(2) == [0, 3], "no run left: the lowest ids"
    assert pool.num_free_blocks == 0


def test_host_pool_ref_counts_and_errors_name_the_block():
    pool = HostBlockPool(4)
    (b,) = pool.allocate(1)
    pool.incref(b)
    pool.decref(b)
    assert pool.ref_cnt[b] == 1 and b not in pool.free_ids()
    pool.decref(b)
    assert pool.free_ids() == [0, 1, 2, 3]
    with pytest.raises(AssertionError, match=rf"double free of host block {b}\b"):
        pool.decref(b)
    with pytest.raises(AssertionError, match=rf"host block {b} is free and cannot be shared"):
        pool.incref(b)
    with pytest.raises(AssertionError, match="5 host blocks wanted, 4 free"):
        pool.allocate(5)


def test_host_pool_freeing_a_block_drops_its_twin():
    pool = HostBlockPool(2)
    (h,) = pool.allocate(1)
    pool.link(7, h)
    assert pool.host_twin(7) == h and pool.device_twin(h) == 7
    with pytest.raises(AssertionError, match="device block 7 already has host twin"):
        pool.link(7, 1)
    pool.decref(h)
    assert pool.host_twin(7) is None and pool.device_twin(h) is None


# --- swap out / in -------------------------------------------------------------------------
def test_swap_out_and_in_moves_the_table_between_pools():
    bm = BlockManager(num_blocks=6, block_size=4, num_host_blocks=6)
    other = computed_seq(bm, 4)
    seq = computed_seq(bm, 10)
    table = list(seq.block_table)
    assert bm.can_swap_out(seq)
    copies = bm.swap_out(seq)
    assert copies == list(zip(table, [0, 1, 2])), "one run of consecutive host ids, in table order"
    assert seq.block_table == [] and seq.host_block_table == [0, 1, 2]
    assert seq.num_computed_tokens == 10
    assert bm.num_free_blocks == 5 and bm.host.num_free_blocks == 3
    assert all(bm.blocks[b].ref_cnt == 0 for b in table)

    assert bm.can_swap_in(seq, 2) and not bm.can_swap_in(seq, 11)  # 3 blocks + 0 or 3 more; 5 free
    back = bm.swap_in(seq)
    assert [h for h, _ in back] == [0, 1, 2] and seq.block_table == [d for _, d in back]
    assert seq.host_block_table == [] and bm.host.num_free_blocks == 6
    assert bm.num_free_blocks == 2 and other.block_table != seq.block_table
    bm.free(seq)
    bm.free(other)
    assert bm.num_free_blocks == 6 and bm.host.twins() == {}


def test_swap_needs_room_on_each_side():
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=2)
    seq = computed_seq(bm, 12)
    assert not bm.can_swap_out(seq)
    with pytest.raises(AssertionError, match="not enough free host blocks"):
        bm.swap_out(seq)
    assert len(seq.block_table) == 3 and bm.host.num_free_blocks == 2

    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=4)
    seq = computed_seq(bm, 12)
    bm.swap_out(seq)
    hog = computed_seq(bm, 8)
    assert bm.num_free_blocks == 2 and not bm.can_swap_in(seq)
    with pytest.raises(AssertionError, match="not enough free device blocks"):
        bm.swap_in(seq)
    bm.free(hog)
    assert bm.can_swap_in(seq, 4) and not bm.can_swap_in(seq, 5)  # 3 blocks, + 1 for tokens 12..15


def test_free_of_a_swapped_sequence_frees_its_host_blocks():
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=4)
    seq = computed_seq(bm, 7)
    bm.swap_out(seq)
    assert bm.host.num_free_blocks == 2
    bm.free(seq)
    assert seq.host_block_table == [] and bm.host.num_free_blocks == 4 and bm.num_free_blocks == 4
    assert all(r == 0 for r in bm.host.ref_cnt)


def test_forked_sequences_swap_out_once_and_come_back_shared():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=8)
    parent = computed_seq(bm, 6)           # blocks [0, 1]; block 1 is half full
    children = [forked(bm, parent) for _ in range(2)]
    shared = list(parent.block_table)
    seqs = [parent, *children]
    copies = [bm.swap_out(s) for s in seqs]
    assert copies[0] == [(shared[0], 0), (shared[1], 1)] and copies[1] == copies[2] == []
    assert all(s.host_block_table == [0, 1] for s in seqs)
    assert bm.host.ref_cnt[:2] == [3, 3] and bm.host.num_free_blocks == 6
    assert bm.num_free_blocks == 8

    back = [bm.swap_in(s) for s in seqs]
    assert len(back[0]) == 2 and back[1] == back[2] == []
    table = seqs[0].block_table
    assert all(s.block_table == table for s in seqs)
    assert [bm.blocks[b].ref_cnt for b in table] == [3, 3] and bm.host.num_free_blocks == 8
    # the first to write into the half-full block copies it (copy-on-write still works)
    assert bm.append_slots(children[0], 1) == [(table[1], children[0].block_table[1])]


def test_a_block_written_since_its_host_copy_is_copied_again():
    """a is swapped out of a block b still holds; b then writes its next token into that block
    (in place, it holds it alone): b's own swap-out must copy the block, not reuse a's stale copy."""
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=4)
    a = computed_seq(bm, 6)
    b = forked(bm, a)
    half_full = a.block_table[1]
    bm.swap_out(a)
    assert bm.host.host_twin(half_full) == a.host_block_table[1]
    assert bm.append_slots(b, 1) == [] and b.block_table[1] == half_full  # written in place
    b.num_computed_tokens += 1
    assert bm.host.host_twin(half_full) is None
    copies = bm.swap_out(b)
    assert copies == [(half_full, 2)], "only the written block is copied; block 0 is shared with a's copy"
    assert b.host_block_table == [a.host_block_table[0], 2]
    assert bm.host.ref_cnt[:3] == [2, 1, 1]


def test_swap_in_reuses_a_block_still_on_the_device():
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=4)
    a = computed_seq(bm, 8)
    b = forked(bm, a)
    table = list(a.block_table)
    bm.swap_out(a)
    assert [bm.blocks[x].ref_cnt for x in table] == [1, 1]
    assert bm.swap_in(a) == [] and a.block_table == table
    assert [bm.blocks[x].ref_cnt for x in table] == [2, 2] and bm.host.num_free_blocks == 4
    bm.free(b)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.host.twins() == {}


def test_can_swap_in_counts_the_copy_of_a_shared_first_write_block():
    bm = BlockManager(num_blocks=3, block_size=4, num_host_blocks=4)
    a = computed_seq(bm, 6)
    b = forked(bm, a)
    bm.swap_out(a)
    hog = computed_seq(bm, 1)
    assert bm.num_free_blocks == 0
    # a's blocks are both still on the device (held by b): coming back costs nothing, but writing
    # token 6 into the shared half-full block costs a copy
    assert bm.can_swap_in(a, 0) and not bm.can_swap_in(a, 1)
    bm.free(hog)
    assert bm.can_swap_in(a, 1) and not bm.can_swap_in(a, 3)  # 6 + 3 tokens need a third block
    bm.swap_in(a)
    assert bm.blocks_needed(a, 1) == 1


# --- stateful property test ----------------------------------------------------------------
class SwapMachine(RuleBasedStateMachine):
    """Sequences step (slot + compute n tokens), fork, swap out, swap in (and maybe step), and free.
    Tokens are unique per sequence and position, so a block read by the wrong sequence shows."""

    MAX_SEQS = 8

    @initialize(num_blocks=st.integers(1, 16), num_host_blocks=st.integers(0, 16),
                block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks: int, num_host_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, num_host_blocks)
        self.bs = block_size
        self.pools = {"device": [[None] * block_size for _ in range(num_blocks)],
                      "host": [[None] * block_size for _ in range(num_host_blocks)]}
        self.versions = {"device": [0] * num_blocks, "host": [0] * num_host_blocks}
        self.on_device: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.tokens = itertools.count(1)
        self.new_version = itertools.count(1)
        self.create(num_prompt_tokens=block_size + 1)  # something to step, fork and swap from the start

    # --- the data model ------------------------------------------------------------------
    def copy(self, src_pool: str, src: int, dst_pool: str, dst: int) -> None:
        self.pools[dst_pool][dst] = list(self.pools[src_pool][src])
        self.versions[dst_pool][dst] = self.versions[src_pool][src]

    def held_versions(self, pool: str) -> set[int]:
        seqs = self.on_device if pool == "device" else self.swapped
        return {self.versions[pool][b] for s in seqs for b in self.table(s, pool)}

    @staticmethod
    def table(seq: Sequence, pool: str) -> list[int]:
        return seq.block_table if pool == "device" else seq.host_block_table

    def step(self, seq: Sequence, n: int) -> bool:
        """append_slots for n tokens if there is room, then compute them (write their tokens)."""
        bm = self.bm
        if not bm.can_append(seq, n):
            assert bm.blocks_needed(seq, n) > bm.num_free_blocks
            return False
        for src, dst in bm.append_slots(seq, n):
            self.copy("device", src, "device", dst)
        while seq.num_tokens < seq.num_computed_tokens + n:
            seq.append_token(next(self.tokens))
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[p // self.bs]
            self.pools["device"][block][p % self.bs] = seq.token_ids[p]
            self.versions["device"][block] = next(self.new_version)
        seq.num_computed_tokens += n
        return True

    # --- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.on_device) + len(self.swapped) < self.MAX_SEQS)
    @rule(num_prompt_tokens=st.integers(1, 24))
    def create(self, num_prompt_tokens: int) -> None:
        seq = Sequence(f"r{len(self.on_device)}", [next(self.tokens) for _ in range(num_prompt_tokens)], PARAMS)
        self.on_device.append(seq)

    @precondition(lambda self: self.on_device)
    @rule(data=st.data(), n=st.integers(1, 12))
    def compute(self, data, n: int) -> None:
        self.step(data.draw(st.sampled_from(self.on_device), label="seq"), n)

    @precondition(lambda self: self.on_device and len(self.on_device) + len(self.swapped) < self.MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data) -> None:
        parent = data.draw(st.sampled_from(self.on_device), label="parent")
        child = Sequence(parent.request_id, parent.prompt_token_ids, PARAMS)
        child.token_ids = list(parent.token_ids)
        self.bm.fork(parent, child)
        self.on_device.append(child)

    @precondition(lambda self: self.on_device)
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        self.swap_out_seq(data.draw(st.sampled_from(self.on_device), label="seq"))

    @precondition(lambda self: self.on_device)
    @rule(data=st.data())
    def swap_out_sharers(self, data) -> None:
        """A sequence and every sequence sharing a block with it, one after the other (forked siblings)."""
        seq = data.draw(st.sampled_from(self.on_device), label="seq")
        for other in [s for s in self.on_device if set(s.block_table) & set(seq.block_table)]:
            self.swap_out_seq(other)

    def swap_out_seq(self, seq: Sequence) -> None:
        bm = self.bm
        on_host = self.held_versions("host")
        fresh = [b for b in seq.block_table if self.versions["device"][b] not in on_host]
        assert bm.can_swap_out(seq) == (len(set(fresh)) <= bm.host.num_free_blocks)
        if not bm.can_swap_out(seq):
            return
        free_before = bm.host.free_ids()
        table = list(seq.block_table)
        copies = bm.swap_out(seq)
        assert [d for d, _ in copies] == fresh, "exactly the blocks with no valid host copy are copied"
        event("swap_out shares a host block" if len(copies) < len(table) else "swap_out copies every block")
        assert [h for _, h in copies] == expected_run(free_before, len(fresh))
        for d, h in copies:
            self.copy("device", d, "host", h)
        for d, h in zip(table, seq.host_block_table):
            assert self.versions["host"][h] == self.versions["device"][d]
        self.on_device.remove(seq)
        self.swapped.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data(), n=st.integers(0, 6))
    def swap_in(self, data, n: int) -> None:
        bm, seq = self.bm, data.draw(st.sampled_from(self.swapped), label="seq")
        on_device = self.held_versions("device")
        table = seq.host_block_table
        fresh = [h for h in table if self.versions["host"][h] not in on_device]
        grow = max(0, cdiv(seq.num_computed_tokens + n, self.bs) - len(table))
        index = seq.num_computed_tokens // self.bs
        cow = n > 0 and index < len(table) and self.versions["host"][table[index]] in on_device
        assert bm.can_swap_in(seq, n) == (len(fresh) + grow + cow <= bm.num_free_blocks)
        if not bm.can_swap_in(seq, n):
            return
        copies = bm.swap_in(seq)
        assert [h for h, _ in copies] == fresh
        event("swap_in shares a device block" if len(copies) < len(table) else "swap_in copies every block")
        event(f"swap_in with copy-on-write: {cow}")
        for h, d in copies:
            self.copy("host", h, "device", d)
        self.swapped.remove(seq)
        self.on_device.append(seq)
        if n:
            assert self.step(seq, n), "can_swap_in promised room for the next tokens"

    @precondition(lambda self: self.on_device or self.swapped)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq = data.draw(st.sampled_from(self.on_device + self.swapped), label="seq")
        (self.on_device if seq in self.on_device else self.swapped).remove(seq)
        self.bm.free(seq)
        assert seq.block_table == [] and seq.host_block_table == []

    # --- invariants ----------------------------------------------------------------------
    @invariant()
    def sequences_find_their_tokens(self) -> None:
        for pool, seqs in (("device", self.on_device), ("host", self.swapped)):
            for seq in seqs:
                table = self.table(seq, pool)
                assert len(table) == cdiv(seq.num_computed_tokens, self.bs)
                for p in range(seq.num_computed_tokens):
                    got = self.pools[pool][table[p // self.bs]][p % self.bs]
                    assert got == seq.token_ids[p], f"{seq} on the {pool}: position {p} holds {got}"

    @invariant()
    def ref_counts_equal_holders(self) -> None:
        device = Counter(b for s in self.on_device for b in s.block_table)
        host = Counter(h for s in self.swapped for h in s.host_block_table)
        assert all(not s.host_block_table for s in self.on_device)
        assert all(not s.block_table for s in self.swapped)
        assert [b.ref_cnt for b in self.bm.blocks] == [device[i] for i in range(self.bm.num_blocks)]
        assert self.bm.host.ref_cnt == [host[i] for i in range(self.bm.host.num_blocks)]

    @invariant()
    def nothing_leaks(self) -> None:
        bm = self.bm
        device_free = [b.block_id for b in bm.free_queue]
        assert sorted(device_free) == [b.block_id for b in bm.blocks if b.ref_cnt == 0]
        assert bm.num_free_blocks == len(device_free)
        host_free = bm.host.free_ids()
        assert host_free == sorted(host_free) == [h for h, r in enumerate(bm.host.ref_cnt) if r == 0]

    @invariant()
    def twins_hold_the_same_data(self) -> None:
        for d, h in self.bm.host.twins().items():
            assert self.bm.blocks[d].ref_cnt > 0 and self.bm.host.ref_cnt[h] > 0, (d, h)
            assert self.versions["device"][d] == self.versions["host"][h], f"stale twin: device {d}, host {h}"

    @invariant()
    def shared_blocks_stay_shared(self) -> None:
        for pool, seqs in (("device", self.on_device), ("host", self.swapped)):
            held = {b for s in seqs for b in self.table(s, pool)}
            versions = [self.versions[pool][b] for b in held]
            assert len(set(versions)) == len(versions), f"one block's data held twice in the {pool} pool"


TestSwapStateful = SwapMachine.TestCase
TestSwapStateful.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
