"""Continuous batching under a token budget.

Each step the scheduler hands the runner one `ScheduledBatch`: how many tokens each
sequence computes now. A decode is a sequence scheduled for 1 token, a prefill chunk is a
sequence scheduled for N; there are no modes. A sequence being admitted first takes the
cached blocks of its longest known prefix (prefix caching), so only the rest is scheduled.
The budget is spent in this order:

1. running sequences that decode (one uncomputed token), so streams keep flowing;
2. running sequences still in prefill, a chunk each from what is left;
3. waiting sequences, admitted while budget, `max_num_seqs` and free blocks allow.

With chunked prefill (the default) a prompt longer than what is left is split over several
steps. Without it a prompt is never split: it joins whole when it fits in what is left, or,
as the step's first prompt, even past the budget, so a long prompt makes one long step that
stalls every running stream (the behaviour `cupaged bench chunked` measures).

When blocks run out, the newest running sequence is preempted. By recompute (the default):
its blocks are freed and it goes back to the front of the waiting queue with its output kept.
By swap (preemption_mode "swap", when the host pool has room): its blocks are copied to host
memory and it waits in the `swapped` queue; swapped sequences come back, before any waiting
request is admitted, as soon as device blocks allow, and resume where they stopped. A
sequence already scheduled this step is never a victim: a prefill chunk that would need
one waits for the next step instead, and no newcomer overtakes it.

Beam search: a beam that has its next-token log-probs before its siblings stays running with
nothing to compute (it is skipped). If only such beams run and the queue's head does not fit,
the newest give their blocks up (they are not queued: the beams forked from them recompute).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledBatch:
    """The scheduler's decision for one step, fixed when it is made: which sequences compute how many
    tokens, which of them sample (reach their last token), and the block moves to run first."""

    seqs: list[Sequence]                 # in the order their tokens are packed
    num_tokens: list[int]                # tokens each computes this step
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the step
    # Run before the step, in this order: swap-outs (device, host), swap-ins (host, device), copies.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    # indices into seqs of the sequences that sample; worked out from seqs when not given
    sample_rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.sample_rows is None:
            rows = (i for i, (seq, n) in enumerate(zip(self.seqs, self.num_tokens))
                    if seq.num_computed_tokens + n == len(seq.token_ids))
        else:
            rows = self.sample_rows
        object.__setattr__(self, "sample_rows", tuple(rows))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Does sequence i reach its last token this step (so a token is sampled)?"""
        return i in self.sample_rows


class _Plan:
    """A step's decision while the scheduler makes it (ScheduledBatch is the finished record)."""

    __slots__ = ("seqs", "num_tokens", "sample_rows", "blocks_to_copy", "blocks_to_swap_out",
                 "blocks_to_swap_in")

    def __init__(self):
        self.seqs, self.num_tokens, self.sample_rows = [], [], []
        self.blocks_to_copy, self.blocks_to_swap_out, self.blocks_to_swap_in = [], [], []

    def add(self, seq: Sequence, n: int) -> None:
        """seq computes n tokens; it samples if they reach its last token."""
        if seq.num_computed_tokens + n == len(seq.token_ids):
            self.sample_rows.append(len(self.seqs))
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def add_decodes(self, seqs: list[Sequence]) -> None:
        """seqs compute one token each, their last: they all sample."""
        self.sample_rows += range(len(self.seqs), len(self.seqs) + len(seqs))
        self.seqs += seqs
        self.num_tokens += [1] * len(seqs)

    def batch(self) -> ScheduledBatch:
        return ScheduledBatch(self.seqs, self.num_tokens, self.blocks_to_copy, self.blocks_to_swap_out,
                              self.blocks_to_swap_in, self.sample_rows)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute", enable_chunked_prefill: bool = True):
        assert preemption_mode in ("recompute", "swap"), preemption_mode
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0   # by recompute or by swap
        self.num_swap_outs = 0     # sequences swapped out / back in
        self.num_swap_ins = 0
        # seconds each sequence waited from joining the queue to its first step, while a list (AsyncLLM
        # sets one and drains it for the server's queue-time histogram); None: not recorded
        self.queue_times: list[float] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence forked between steps from a running one (it holds shared blocks)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledBatch:
        batch = _Plan()
        num_preemptions = self.num_preemptions
        budget = self._schedule_decodes(batch, self.max_num_batched_tokens)
        budget = self._schedule_prefill_chunks(batch, budget)
        if self.num_preemptions == num_preemptions:  # nothing was preempted: room to come back or join
            budget = self._schedule_swapped(batch, budget)
            if not self.swapped:  # swapped sequences go before newcomers
                self._schedule_waiting(batch, budget)
        if not batch.seqs and self.running and self.waiting and not self.swapped:  # all wait on a sibling
            self._make_room(budget)
            self._schedule_waiting(batch, budget)
        return batch.batch()

    def _schedule_decodes(self, batch: _Plan, budget: int) -> int:
        """One token each for running sequences that decode, preempting the newest for blocks."""
        decoding = [s for s in self.running if s.num_computed_tokens + 1 == len(s.token_ids)]
        if len(decoding) <= budget and self._append_all(decoding, batch):
            batch.add_decodes(decoding)  # the steady state: every decode runs, no one is preempted
            return budget - len(decoding)
        running = SequenceStatus.RUNNING
        for seq in decoding:
            if budget == 0:
                break
            if seq.status is not running:  # preempted below, as a victim
                continue
            while not self.block_manager.can_append(seq, 1):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                budget -= self._take(batch, seq, 1)
        return budget

    def _append_all(self, decoding: list[Sequence], batch: _Plan) -> bool:
        """Give every decode the slot for its token if the free blocks are enough for all of them (the
        few whose last block is full or shared get one); False, with nothing done, if they might not be."""
        bm = self.block_manager
        short = bm.without_room(decoding)
        if short is None or sum(bm.blocks_needed(seq, 1) for seq in short) > bm.num_free_blocks:
            return False
        for seq in short:
            batch.blocks_to_copy += bm.append_slots(seq, 1)
        return True

    def _schedule_prefill_chunks(self, batch: _Plan, budget: int) -> int:
        """A chunk each for running sequences still in prefill, from what the decodes left."""
        if len(batch.seqs) == len(self.running):  # every running sequence decodes this step
            return budget
        for seq in [s for s in self.running if len(s.token_ids) - s.num_computed_tokens > 1]:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:  # a beam holding its next-token log-probs until its siblings have theirs
                continue
            while not self.block_manager.can_append(seq, n):
                victim = self.running[-1]
                if victim in batch.seqs:  # scheduled this step: the chunk waits, and so do newcomers
                    return 0
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                budget -= self._take(batch, seq, n)
        return budget

    def _schedule_swapped(self, batch: _Plan, budget: int) -> int:
        if not self.swapped:
            return budget
        seats = sum(seq.num_seats for seq in self.running)
        while self.swapped and budget > 0 and seats + self.swapped[0].num_seats <= self.max_num_seqs:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_swap_in(seq, n):
                break
            self.swapped.popleft()
            batch.blocks_to_swap_in += self.block_manager.swap_in(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.num_swap_ins += 1
            seats += seq.num_seats
            budget -= self._take(batch, seq, n)
        return budget

    def _schedule_waiting(self, batch: _Plan, budget: int) -> None:
        if not self.waiting:
            return
        first_prompt = True
        seats = sum(seq.num_seats for seq in self.running)  # a prompt of n samples needs n places
        while self.waiting and budget > 0 and seats + self.waiting[0].num_seats <= self.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, budget, first_prompt)
            if n is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.queued_at is not None:
                if self.queue_times is not None:
                    self.queue_times.append(time.monotonic() - seq.queued_at)
                seq.queued_at = None
            seats += seq.num_seats
            budget = max(0, budget - self._take(batch, seq, n))
            first_prompt = False

    def _admitted_tokens(self, seq: Sequence, budget: int, first_prompt: bool) -> int:
        """Tokens a waiting seq computes if admitted now: a chunk, or (chunking off) all or nothing."""
        if self.enable_chunked_prefill:
            return min(seq.num_uncomputed_tokens, budget)
        whole = seq.num_uncomputed_tokens
        return whole if whole <= budget or first_prompt else 0

    def _make_room(self, budget: int) -> None:
        """Every running sequence is a beam waiting on a queued sibling that does not fit: the newest
        give their blocks up until it does."""
        head = self.waiting[0]
        n = min(head.num_uncomputed_tokens, budget)
        while self.running and not (sum(s.num_seats for s in self.running) + head.num_seats <= self.max_num_seqs
                                    and self.block_manager.can_append(head, n)):
            self.preempt(self.running[-1])

    def _admit(self, seq: Sequence, budget: int, first_prompt: bool) -> int | None:
        """Reuse seq's cached prefix, then size its first chunk. None if it may not join now or the
        blocks for that chunk are short; seq then holds nothing and waits (cached blocks count as
        taken from the free pool, so admission never over-commits)."""
        self.block_manager.reuse_cached_prefix(seq)
        n = self._admitted_tokens(seq, budget, first_prompt)
        if n and self.block_manager.can_append(seq, n):
            return n
        self.block_manager.cancel_reuse(seq)
        return None

    def _take(self, batch: _Plan, seq: Sequence, n: int) -> int:
        batch.blocks_to_copy += self.block_manager.append_slots(seq, n)
        batch.add(seq, n)
        return n

    def _preempt(self, seq: Sequence, batch: _Plan) -> None:
        """Swap seq out (preemption_mode "swap", room on the host) or preempt it by recompute. A beam
        waiting on its siblings is never swapped: preempt drops it (its forks recompute)."""
        if self.preemption_mode == "swap" and seq.num_uncomputed_tokens > 0:
            if self.block_manager.can_swap_out(seq):
                self.swap_out(seq, batch)
                return
            logger.info("swap space is full (%d host blocks free): falling back to recompute",
                        self.block_manager.host.num_free_blocks)
        self.preempt(seq)

    def swap_out(self, seq: Sequence, batch: _Plan) -> None:
        """Move seq's KV to host memory (the copies join batch) and queue it to come back first."""
        logger.info("preempting %s (swap out %d blocks)", seq.request_id, len(seq.block_table))
        self.running.remove(seq)
        batch.blocks_to_swap_out += self.block_manager.swap_out(seq)
        seq.status = SequenceStatus.SWAPPED
        seq.num_preemptions += 1
        self.swapped.appendleft(seq)  # victims go newest first: the oldest ends up in front
        self.num_preemptions += 1
        self.num_swap_outs += 1

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
        elif seq in self.swapped:
            self.swapped.remove(seq)
        self.block_manager.free(seq)  # device or host blocks
