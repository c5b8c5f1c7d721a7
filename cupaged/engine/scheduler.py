"""Continuous batching under a token budget.

Each step the scheduler hands the runner one `ScheduledBatch`: how many tokens each
sequence computes now. A decode is a sequence scheduled for 1 token, a prefill chunk is a
sequence scheduled for N; there are no modes. The budget is spent in this order:

1. running sequences that decode (one uncomputed token), so streams keep flowing;
2. running sequences still in prefill, a chunk each from what is left;
3. waiting sequences, admitted while budget, `max_num_seqs` and free blocks allow.

With chunked prefill (the default) a prompt longer than what is left is split over several
steps. Without it a prompt is never split: it joins whole when it fits in what is left, or,
as the step's first prompt, even past the budget, so a long prompt makes one long step that
stalls every running stream (the behaviour `cupaged bench chunked` measures).

When blocks run out, the newest running sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the waiting queue with its output kept. A
sequence already scheduled this step is never a victim: a prefill chunk that would need
one waits for the next step instead, and no newcomer overtakes it.
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
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
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
        budget = self._schedule_decodes(batch, self.max_num_batched_tokens)
        budget = self._schedule_prefill_chunks(batch, budget)
        if self.num_preemptions == num_preemptions:  # nothing was preempted: room for newcomers
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, budget: int) -> int:
        """One token each for running sequences that decode, preempting the newest for blocks."""
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below, as a victim
                continue
            while not self.block_manager.can_append(seq, 1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                budget -= self._take(batch, seq, 1)
        return budget

    def _schedule_prefill_chunks(self, batch: ScheduledBatch, budget: int) -> int:
        """A chunk each for running sequences still in prefill, from what the decodes left."""
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_append(seq, n):
                victim = self.running[-1]
                if victim in batch.seqs:  # scheduled this step: the chunk waits, and so do newcomers
                    return 0
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                budget -= self._take(batch, seq, n)
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        first_prompt = True
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self._admitted_tokens(seq, budget, first_prompt)
            if n == 0 or not self.block_manager.can_append(seq, n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget = max(0, budget - self._take(batch, seq, n))
            first_prompt = False

    def _admitted_tokens(self, seq: Sequence, budget: int, first_prompt: bool) -> int:
        """Tokens a waiting seq computes if admitted now: a chunk, or (chunking off) all or nothing."""
        if self.enable_chunked_prefill:
            return min(seq.num_uncomputed_tokens, budget)
        whole = seq.num_uncomputed_tokens
        return whole if whole <= budget or first_prompt else 0

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
