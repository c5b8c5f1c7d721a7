"""Continuous batching under a token budget.

Each step the scheduler hands the runner one `ScheduledBatch`: how many tokens each
sequence computes now. A decode is a sequence scheduled for 1 token, a prefill chunk is a
sequence scheduled for N; there are no modes. Running sequences are served first (so
streams keep flowing), then waiting ones join while budget, `max_num_seqs` and free
blocks allow. A prompt longer than the budget is prefilled over several steps.

When blocks run out, the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the waiting queue with its output kept.

Beam search: a beam that has its next-token log-probs before its siblings stays running with
nothing to compute (it is skipped). If only such beams run and the queue's head does not fit,
the newest give their blocks up (they are not queued: the beams forked from them recompute).
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

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence forked between steps from a running one (it holds shared blocks)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        num_preemptions = self.num_preemptions
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if self.num_preemptions == num_preemptions:  # nothing was preempted: room for newcomers
            self._schedule_waiting(batch, budget)
        if not batch.seqs and self.running and self.waiting:  # all running wait on a lagging sibling
            self._make_room(budget)
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below, as a victim
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:  # a beam holding its next-token log-probs until its siblings have theirs
                continue
            while not self.block_manager.can_append(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                budget -= self._take(batch, seq, n)
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        seats = sum(seq.num_seats for seq in self.running)  # a prompt of n samples needs n places
        while self.waiting and budget > 0 and seats + self.waiting[0].num_seats <= self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_append(seq, n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats += seq.num_seats
            budget -= self._take(batch, seq, n)

    def _make_room(self, budget: int) -> None:
        """Every running sequence is a beam waiting on a queued sibling that does not fit: the newest
        give their blocks up until it does."""
        head = self.waiting[0]
        n = min(head.num_uncomputed_tokens, budget)
        while self.running and not (sum(s.num_seats for s in self.running) + head.num_seats <= self.max_num_seqs
                                    and self.block_manager.can_append(head, n)):
            self.preempt(self.running[-1])

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> int:
        batch.blocks_to_copy += self.block_manager.append_slots(seq, n)
        batch.seqs.append(seq)
        batch.num_tokens.append(n)
        return n

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it to be recomputed first. A beam waiting on its siblings
        (it has its next-token log-probs, nothing to compute) is not queued: the beams that the
        search forks from it recompute instead."""
        logger.info("preempting %s (recompute)", seq.request_id)
        waits_on_siblings = seq.num_uncomputed_tokens == 0
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        if not waits_on_siblings:
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
