"""The host block pool: KV blocks in host memory that preempted sequences are swapped out to.

Pure Python accounting, like the device pool in block_manager.py: a ref count per block (a
block shared by forked sequences is copied out once and comes back shared). Free ids are kept
sorted, so that one sequence's blocks are handed out as a run of consecutive ids wherever the
pool allows: with the cache layout [NB, BS, Hk, D] a run of blocks is one contiguous chunk,
which the CUDA backend moves in one transfer.

Twins. A device block and a host block hold the same data right after one was copied into
the other. While both stay unchanged, a second holder of the device block that is swapped
out reuses the host copy (and the other way round on swap-in), so sharing survives the trip.
The link is dropped as soon as either side is freed or the device block is written in place.
"""
from __future__ import annotations

import bisect


class HostBlockPool:
    """Host blocks with ref counts, a sorted free list, and the device <-> host twin links."""

    def __init__(self, num_blocks: int):
        assert num_blocks >= 0
        self.ref_cnt = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks))   # ascending
        self._host_of: dict[int, int] = {}                 # device block id -> host twin id
        self._device_of: dict[int, int] = {}               # host block id -> device twin id

    @property
    def num_blocks(self) -> int:
        return len(self.ref_cnt)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def free_ids(self) -> list[int]:
        """The free host block ids, ascending (a copy)."""
        return list(self._free)

    # --- allocation -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n free blocks (ref_cnt 1): the lowest run of n consecutive ids, else the n lowest ids."""
        assert 0 <= n <= len(self._free), f"{n} host blocks wanted, {len(self._free)} free"
        start = self._find_run(n)
        ids = self._free[start:start + n]
        del self._free[start:start + n]
        for block_id in ids:
            assert self.ref_cnt[block_id] == 0, f"free host block {block_id} has ref_cnt {self.ref_cnt[block_id]}"
            self.ref_cnt[block_id] = 1
        return ids

    def incref(self, block_id: int) -> None:
        assert self.ref_cnt[block_id] > 0, f"host block {block_id} is free and cannot be shared"
        self.ref_cnt[block_id] += 1

    def decref(self, block_id: int) -> None:
        """Drop one hold; a block nobody holds goes back to the free list and loses its twin."""
        assert self.ref_cnt[block_id] > 0, f"double free of host block {block_id}"
        self.ref_cnt[block_id] -= 1
        if self.ref_cnt[block_id] == 0:
            self.forget_host(block_id)
            bisect.insort(self._free, block_id)

    def _find_run(self, n: int) -> int:
        """Index in the free list of the first n consecutive ids (0 when the pool is too fragmented)."""
        free = self._free
        if n == 0:
            return 0
        for i in range(len(free) - n + 1):
            if free[i + n - 1] - free[i] == n - 1:  # sorted and unique: the n ids in between are consecutive
                return i
        return 0

    # --- twins ------------------------------------------------------------------------------
    def host_twin(self, device_id: int) -> int | None:
        return self._host_of.get(device_id)

    def device_twin(self, host_id: int) -> int | None:
        return self._device_of.get(host_id)

    def link(self, device_id: int, host_id: int) -> None:
        """Record that the two blocks hold the same data (one was just copied into the other)."""
        assert device_id not in self._host_of, \
            f"device block {device_id} already has host twin {self._host_of[device_id]}"
        assert host_id not in self._device_of, \
            f"host block {host_id} already has device twin {self._device_of[host_id]}"
        self._host_of[device_id] = host_id
        self._device_of[host_id] = device_id

    @property
    def num_twins(self) -> int:
        """Device blocks that have a valid host twin now."""
        return len(self._host_of)

    def forget_device(self, device_id: int) -> None:
        """The device block is freed or about to be written: its host twin no longer matches it."""
        host_id = self._host_of.pop(device_id, None)
        if host_id is not None:
            del self._device_of[host_id]

    def forget_host(self, host_id: int) -> None:
        device_id = self._device_of.pop(host_id, None)
        if device_id is not None:
            del self._host_of[device_id]

    def twins(self) -> dict[int, int]:
        """device id -> host id of every live link (a copy, for checks)."""
        return dict(self._host_of)
