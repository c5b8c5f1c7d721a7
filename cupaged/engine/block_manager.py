"""Block manager: a fixed pool of KV-cache blocks, with ref counts.

Pure Python, no array imports. A block's object is made the first time its id is handed out
and then lives as long as the pool, so start-up is O(1) however many blocks there are. Free
blocks sit in a queue: the never-used ids, then a doubly linked list threaded through the
freed blocks themselves, so allocate (pop the head), free (push the tail) and taking a block
out of the middle (prefix-cache reuse) are all O(1) with no Python objects made per step.

A sequence's `block_table` lists its physical block ids in order; token position p lives
in slot `block_table[p // block_size] * block_size + p % block_size`. A block held by
several sequences (ref_cnt > 1) is copied before anyone writes into it (copy-on-write).

Prefix caching (optional): every full block of computed tokens is named by a chained hash
(engine/prefix_cache.py) in `cached_blocks`. A freed block keeps its name while it sits in the
free queue, so a later sequence with the same prefix takes it back instead of recomputing it;
allocation evicts the name of the block it pops. The queue is LRU: blocks are pushed on the
tail when freed (a sequence's last block first, so it is evicted before its earlier blocks)
and allocation pops the head.

Swap (preemption_mode "swap"): `swap_out` moves a sequence's table into the host pool
(cupaged/engine/swap.py) and `swap_in` brings it back; both return the block copies the
runner performs before the step. While swapped out, `seq.host_block_table` holds the host ids
and `seq.block_table` is empty.
"""
from __future__ import annotations

from cupaged.engine.prefix_cache import BlockHash, PrefixCacheStats, extend_block_hashes
from cupaged.engine.sequence import Sequence
from cupaged.engine.swap import HostBlockPool
from cupaged.util import cdiv


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set while the block is in the prefix cache
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_cnt={self.ref_cnt})"


class BlockPool:
    """The device blocks, by id, made on first use: a pool of millions (a small model on a large
    GPU) costs no Python objects at start-up. Blocks are handed out lowest id first until each
    has been used once, so the blocks made are almost always the prefix [0, len(made))."""

    def __init__(self, num_blocks: int):
        self._num_blocks = num_blocks
        self._made: list[Block] = []

    def __len__(self) -> int:
        return self._num_blocks

    def __getitem__(self, block_id: int) -> Block:
        if block_id >= len(self._made):
            if not 0 <= block_id < self._num_blocks:
                raise IndexError(f"block id {block_id} is not in [0, {self._num_blocks})")
            self._made.extend(Block(i) for i in range(len(self._made), block_id + 1))
        return self._made[block_id]

    def __iter__(self):
        return (self[i] for i in range(self._num_blocks))


class FreeBlockQueue:
    """The free blocks in LRU order: first the never-used ids [next_fresh, N), ascending, then a
    doubly linked list of freed blocks. O(1) popleft, append and remove, O(1) to build."""

    def __init__(self, pool: BlockPool):
        self._pool = pool
        self.next_fresh = 0  # ids from here on have never been handed out
        self._head = Block(-1)  # sentinels of the linked part
        self._tail = Block(-2)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_linked = 0

    @property
    def num_free(self) -> int:
        return len(self._pool) - self.next_fresh + self.num_linked

    def append(self, block: Block) -> None:
        last = self._tail.prev
        assert last is not None
        block.prev, block.next = last, self._tail
        last.next = block
        self._tail.prev = block
        self.num_linked += 1

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, f"block {block.block_id} is not free"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_linked -= 1

    def popleft(self) -> Block:
        if self.next_fresh < len(self._pool):
            self.next_fresh += 1
            return self._pool[self.next_fresh - 1]
        block = self._head.next
        assert block is not None and block is not self._tail, "no free block"
        self.remove(block)
        return block

    def __iter__(self):
        for block_id in range(self.next_fresh, len(self._pool)):
            yield self._pool[block_id]
        block = self._head.next
        while block is not None and block is not self._tail:
            yield block
            block = block.next


class BlockManager:
    """Hands out KV blocks to sequences. All operations are O(blocks touched)."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.blocks = BlockPool(num_blocks)
        self._made = self.blocks._made  # every block a table holds is made: the hot paths index this list
        self.free_queue = FreeBlockQueue(self.blocks)
        self.host = HostBlockPool(num_host_blocks)  # the swap pool; empty unless preemption_mode is "swap"
        self.enable_prefix_caching = enable_prefix_caching
        self.cached_blocks: dict[BlockHash, Block] = {}  # prefix hash -> the one block named by it
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0     # tokens reused from the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that seq's table covers num_computed_tokens + num_new_tokens,
        plus one if the block written first is shared and must be copied."""
        total = seq.num_computed_tokens + num_new_tokens
        needed = max(0, cdiv(total, self.block_size) - len(seq.block_table))
        return needed + int(self._first_write_is_shared(seq, num_new_tokens))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Grow seq's table to hold num_new_tokens more tokens. Returns (src, dst) block
        copies that must run before the step (copy-on-write of a shared block)."""
        if self.fits_in_place(seq, num_new_tokens):
            return []
        assert self.can_append(seq, num_new_tokens), f"not enough free blocks for {seq}"
        copies = []
        if self._first_write_is_shared(seq, num_new_tokens):
            index = seq.num_computed_tokens // self.block_size
            src = self.blocks[seq.block_table[index]]
            dst = self._allocate()
            self._decref(src)
            seq.block_table = seq.block_table.copy()  # a new list: tables are append-only in place (block_tables.py)
            seq.block_table[index] = dst.block_id
            copies.append((src.block_id, dst.block_id))
        if num_new_tokens > 0:  # blocks written in place no longer match a host twin
            for block_id in seq.block_table[seq.num_computed_tokens // self.block_size:]:
                self.host.forget_device(block_id)
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._allocate().block_id)
        return copies

    def fits_in_place(self, seq: Sequence, num_new_tokens: int) -> bool:
        """The common decode: seq's own last block has room for the new tokens, so append_slots has
        nothing to allocate, copy or forget (no host twins exist)."""
        table, bs = seq.block_table, self.block_size
        computed = seq.num_computed_tokens
        return (0 < num_new_tokens and computed + num_new_tokens <= len(table) * bs
                and self._made[table[computed // bs]].ref_cnt == 1 and not self.host.num_twins)

    def without_room(self, seqs: list[Sequence]) -> list[Sequence] | None:
        """Of seqs, each about to compute one token, those whose own last block cannot take it in place
        (full, or shared); None while host twins exist (then every append goes through append_slots)."""
        if self.host.num_twins:
            return None
        made, bs = self._made, self.block_size
        return [s for s in seqs if not (s.num_computed_tokens < len(s.block_table) * bs
                                        and made[s.block_table[s.num_computed_tokens // bs]].ref_cnt == 1)]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share all of parent's blocks (prompt sharing for n > 1). Fork between steps:
        copy-on-write covers only the one partly written block, not blocks reserved ahead."""
        assert not child.block_table, f"{child} already holds blocks"
        assert len(parent.block_table) == cdiv(parent.num_computed_tokens, self.block_size), \
            f"fork of {parent} with blocks reserved but not yet computed"
        for block_id in parent.block_table:
            self._incref(self.blocks[block_id])
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.cache_salt = parent.cache_salt
        child.block_hashes = parent.block_hashes[:parent.num_computed_tokens // self.block_size]
        child.num_cached_blocks = parent.num_cached_blocks

    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks; blocks nobody holds go back to the pool."""
        for block_id in reversed(seq.block_table):
            self._decref(self._made[block_id])
        seq.block_table = []
        for host_id in reversed(seq.host_block_table):  # a swapped-out sequence holds host blocks instead
            self.host.decref(host_id)
        seq.host_block_table = []
        seq.num_cached_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # --- swap to host memory -------------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return self._host_blocks_needed(seq) <= self.host.num_free_blocks

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move seq's blocks to the host pool. Returns (device, host) block copies that must run
        before the freed device blocks are written. A device block whose host twin is still valid
        (another holder was swapped out before) is not copied again: the host block is shared."""
        assert not seq.host_block_table, f"{seq} is already swapped out"
        assert self.can_swap_out(seq), f"not enough free host blocks for {seq}"
        fresh = iter(self.host.allocate(self._host_blocks_needed(seq)))  # one run of ids where possible
        copies, table = [], []
        for device_id in seq.block_table:
            host_id = self.host.host_twin(device_id)
            if host_id is None:
                host_id = next(fresh)
                self.host.link(device_id, host_id)
                copies.append((device_id, host_id))
            else:
                self.host.incref(host_id)
            table.append(host_id)
        self.free(seq)  # device blocks nobody else holds go back to the pool (and lose their twin)
        seq.host_block_table = table
        return copies

    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool:
        """Room on the device for seq's blocks and for the num_new_tokens it computes next."""
        return self._swap_in_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring seq's blocks back from the host pool. Returns (host, device) block copies that must
        run before the step reads them. A host block whose device twin is still valid is not copied:
        seq shares the device block again."""
        assert not seq.block_table, f"{seq} holds device blocks"
        assert self.can_swap_in(seq), f"not enough free device blocks to swap in {seq}"
        copies, table = [], []
        for host_id in seq.host_block_table:
            device_id = self.host.device_twin(host_id)
            if device_id is None:
                device_id = self._allocate().block_id
                self.host.link(device_id, host_id)
                copies.append((host_id, device_id))
            else:
                self._incref(self.blocks[device_id])
            table.append(device_id)
        self.free(seq)  # host blocks nobody else holds go back to the host pool
        seq.block_table = table
        return copies

    def _host_blocks_needed(self, seq: Sequence) -> int:
        return sum(self.host.host_twin(b) is None for b in seq.block_table)

    def _swap_in_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Device blocks for the copies, the growth by num_new_tokens, and a copy-on-write when the
        block written first comes back shared (it has a device twin held by another sequence)."""
        table, bs = seq.host_block_table, self.block_size
        needed = sum(self.host.device_twin(h) is None for h in table)
        needed += max(0, cdiv(seq.num_computed_tokens + num_new_tokens, bs) - len(table))
        index = seq.num_computed_tokens // bs
        if num_new_tokens > 0 and index < len(table) and self.host.device_twin(table[index]) is not None:
            needed += 1
        return needed

    # --- prefix cache ---------------------------------------------------------------------
    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """Give seq (holding no blocks) the longest run of cached blocks matching its tokens,
        leaving at least one token to compute. Sets its block table and num_computed_tokens,
        counts the lookup, and returns the number of tokens reused."""
        assert not seq.block_table, f"{seq} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        blocks = self._find_cached_prefix(seq)
        for block in blocks:
            self._take_cached(block)
        seq.block_table = [block.block_id for block in blocks]
        seq.num_cached_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def cancel_reuse(self, seq: Sequence) -> None:
        """Undo reuse_cached_prefix for a sequence that could not be admitted after all:
        its blocks go back (still cached) and the lookup is not counted."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries -= seq.num_tokens
            self.prefix_cache_hits -= seq.num_computed_tokens
        self.free(seq)
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Name every block of seq that became full of computed tokens since the last call."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_cached_blocks:
            return
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, num_full, seq.cache_salt)
        for i in range(seq.num_cached_blocks, num_full):
            self._register(self.blocks[seq.block_table[i]], hashes[i])
        seq.num_cached_blocks = num_full

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """A snapshot of the counters (tokens looked up, tokens reused, hit rate)."""
        return PrefixCacheStats(self.prefix_cache_queries, self.prefix_cache_hits)

    def _find_cached_prefix(self, seq: Sequence) -> list[Block]:
        max_blocks = (seq.num_tokens - 1) // self.block_size  # at least one token left to compute
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, max_blocks, seq.cache_salt)
        found = []
        for block_hash in hashes[:max_blocks]:
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def _take_cached(self, block: Block) -> None:
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1

    def _register(self, block: Block, block_hash: BlockHash) -> None:
        if block.block_hash is not None:  # shared with the sequence that named it
            assert block.block_hash == block_hash, f"block {block.block_id} is cached under another prefix"
            return
        if block_hash not in self.cached_blocks:  # else another block already holds this prefix
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def _evict(self, block: Block) -> None:
        owner = self.cached_blocks.pop(block.block_hash, None)
        assert owner is block, f"block {block.block_id} is named by a hash that maps to {owner}"
        block.block_hash = None

    # --- internals ----------------------------------------------------------------------
    def _first_write_is_shared(self, seq: Sequence, num_new_tokens: int) -> bool:
        index = seq.num_computed_tokens // self.block_size
        if num_new_tokens <= 0 or index >= len(seq.block_table):
            return False
        return self._made[seq.block_table[index]].ref_cnt > 1

    def _allocate(self) -> Block:
        block = self.free_queue.popleft()
        assert block.ref_cnt == 0, f"free block {block.block_id} has ref_cnt {block.ref_cnt}"
        if block.block_hash is not None:
            self._evict(block)
        block.ref_cnt = 1
        return block

    def _incref(self, block: Block) -> None:
        assert block.ref_cnt > 0, f"block {block.block_id} is free and cannot be shared"
        block.ref_cnt += 1

    def _decref(self, block: Block) -> None:
        assert block.ref_cnt > 0, f"double free of block {block.block_id}"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:  # a cached block keeps its name until it is evicted
            self.host.forget_device(block.block_id)
            self.free_queue.append(block)
