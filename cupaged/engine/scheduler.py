"""Continuous batching under a token budget.

Each step the scheduler hands the runner one `ScheduledBatch`: how many tokens each
sequence computes now. A decode is a sequence scheduled for 1 token, a prefill chunk is a
sequence scheduled for N; there are no modes. Running sequences are served first (so
streams keep flowing), then waiting ones join while budget, `max_num_seqs` and free
blocks allow. A prompt longer than the budget is prefilled over several steps. A sequence
being admitted first takes the cached blocks of its longest known prefix (prefix caching), so
only the rest is scheduled.

When blocks run out, the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the waiting queue with its output kept.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """The scheduler's decision for one step."""

    seqs: list[Sequence]                 # in the order their tokens are packed
    num_tokens: list[int]                # tokens each computes this step
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Does sequence i reach its last token this step (so a token is sampled)?"""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        num_preemptions = self.num_preemptions
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if self.num_preemptions == num_preemptions:  # nothing was preempted: room for newcomers
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below, as a victim
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_append(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                budget -= self._take(batch, seq, n)
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= self._take(batch, seq, n)

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Reuse seq's cached prefix, then size its first chunk. None if the blocks for that
        chunk are short; seq then holds nothing and waits (cached blocks count as taken from
        the free pool, so admission never over-commits)."""
        self.block_manager.reuse_cached_prefix(seq)
        n = min(seq.num_uncomputed_tokens, budget)
        if self.block_manager.can_append(seq, n):
            return n
        self.block_manager.cancel_reuse(seq)
        return None

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> int:
        batch.blocks_to_copy += self.block_manager.append_slots(seq, n)
        batch.seqs.append(seq)
        batch.num_tokens.append(n)
        return n

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it to be recomputed first."""
        logger.info("preempting %s (recompute)", seq.request_id)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and release its blocks, wherever it is."""
        seq.finish(reason)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
