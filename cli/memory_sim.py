"""Replay a request trace through KV memory alone (no model): how much of what is reserved holds K/V.

Each step of `Replay.step`:
1. sequences that reached input_len + output_len tokens finish and free their memory;
2. every running sequence grows by one token, oldest first; when memory runs out the newest running
   sequence is preempted by recompute (freed, back to the front of the queue with its tokens kept),
   as the engine's scheduler does;
3. arrived requests are admitted first come, first served while their prompts fit (and
   max_num_seqs allows); a request with n > 1 admits its n samples together;
4. the step's memory is recorded: tokens reserved, tokens holding a K/V, requests running.

Two memories share that loop:
- `PagedMemory`: the engine's `BlockManager`. Reserved = blocks held x block_size. Parallel samples
  share the prompt's blocks through `BlockManager.fork` (copy-on-write on the first write into the
  shared last block), or hold independent copies (share=False).
- `ContiguousMemory`: one max_model_len slot reserved per sequence at admission, as engines
  before PagedAttention did. It never preempts.

A token held in a block shared by several sequences is counted once in `used_tokens`;
`saved_blocks` counts the extra references (the blocks independent copies would need on top).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cupaged.cli.memory_trace import TraceRequest
from cupaged.engine.block_manager import BlockManager
from cupaged.engine.sequence import Sequence
from cupaged.errors import TraceError
from cupaged.sampling_params import SamplingParams
from cupaged.util import cdiv

_PARAMS = SamplingParams()
_PREFIX_BASE = 1_000_000_000   # token ids of shared prefixes: base + prefix index * 2^20 + position


@dataclass
class StepRecord:
    """What each replayed step left in memory (lists of one entry per step)."""

    time_s: list[float] = field(default_factory=list)          # the step's time (idle gaps skipped)
    reserved_tokens: list[int] = field(default_factory=list)
    used_tokens: list[int] = field(default_factory=list)
    running_requests: list[int] = field(default_factory=list)
    saved_blocks: list[int] = field(default_factory=list)


# ---- memories -------------------------------------------------------------------------------------
class PagedMemory:
    """KV memory as `num_blocks` blocks of `block_size` tokens, handed out by the engine's BlockManager."""

    def __init__(self, kv_tokens: int, block_size: int, share: bool = True, prefix_caching: bool = False,
                 watermark: float = 0.01):
        self.block_size = block_size
        self.share = share
        self.watermark_blocks = int(watermark * (kv_tokens // block_size))  # kept free at admission
        self.prefix_caching = prefix_caching
        # --- prefix-caching hook: the API another worker is adding to BlockManager ---------------------
        # BlockManager(num_blocks, block_size, enable_prefix_caching=True); reuse_cached_prefix(seq) at
        # admission returns the tokens reused (their blocks put in seq.block_table); cache_full_blocks(seq)
        # after num_computed_tokens advances; counters prefix_cache_queries / prefix_cache_hits.
        if prefix_caching:
            self.bm = BlockManager(kv_tokens // block_size, block_size, enable_prefix_caching=True)
        else:
            self.bm = BlockManager(kv_tokens // block_size, block_size)
        self.sharing: set[Sequence] = set()   # sequences that may hold a shared block
        self.tokens_reused = 0

    def admit(self, seqs: list[Sequence], fresh: bool) -> bool:
        """Allocate and compute every seq's tokens; fork the first's blocks to the others when the
        group is a fresh request and share is on. False (nothing allocated) if they do not fit."""
        fork = fresh and self.share and len(seqs) > 1
        bs = self.bm.block_size
        need = cdiv(seqs[0].num_tokens, bs) * (1 if fork else len(seqs))
        free = self.bm.num_free_blocks
        in_use = free < self.bm.num_blocks  # the watermark keeps room for running sequences to grow
        if not self.prefix_caching and need + (self.watermark_blocks if in_use else 0) > free:
            return False
        for i, seq in enumerate(seqs):
            if fork and i > 0:
                self.bm.fork(seqs[0], seq)
                self.sharing.add(seq)
            elif not self._compute(seq):
                for done in seqs[:i]:
                    self.free(done)
                return False
        if fork:
            self.sharing.add(seqs[0])
        return True

    def _compute(self, seq: Sequence) -> bool:
        if self.prefix_caching:
            reused = self.bm.reuse_cached_prefix(seq)
            seq.num_computed_tokens = reused   # the hook's contract: these tokens' blocks are in block_table
            if reused:
                self.tokens_reused += reused
                self.sharing.add(seq)
        if not self.bm.can_append(seq, seq.num_uncomputed_tokens):
            self.free(seq)
            return False
        self.bm.append_slots(seq, seq.num_uncomputed_tokens)
        seq.num_computed_tokens = seq.num_tokens
        if self.prefix_caching:
            self.bm.cache_full_blocks(seq)
        return True

    def problem(self, req: TraceRequest) -> str | None:
        """Why req could never be admitted or finished in this pool, or None."""
        blocks = cdiv(req.input_len + req.output_len, self.block_size)
        prompt_blocks = cdiv(req.input_len, self.block_size)
        if blocks > self.bm.num_blocks:
            return f"one sequence needs {blocks} blocks of {self.block_size}, the pool has {self.bm.num_blocks}"
        if not self.share and req.n * prompt_blocks > self.bm.num_blocks:
            return f"{req.n} prompt copies need {req.n * prompt_blocks} blocks, the pool has {self.bm.num_blocks}"
        return None

    def grow(self, seq: Sequence) -> bool:
        """Write seq's newest token (already appended); False if no block is free for it."""
        if not self.bm.can_append(seq, 1):
            return False
        self.bm.append_slots(seq, 1)
        seq.num_computed_tokens += 1
        if self.prefix_caching and seq.num_computed_tokens % self.block_size == 0:
            self.bm.cache_full_blocks(seq)
        return True

    def free(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        self.sharing.discard(seq)

    def reserved_tokens(self) -> int:
        return (self.bm.num_blocks - self.bm.num_free_blocks) * self.block_size

    def used_tokens(self, running: list[Sequence]) -> int:
        """Tokens holding K/V, each physical slot once: sum over sequences minus what shared blocks repeat."""
        repeated: dict[int, int] = {}  # shared block id -> tokens it holds
        bs = self.block_size
        for seq in self.sharing:
            for index, block_id in enumerate(seq.block_table):
                if self.bm.blocks[block_id].ref_cnt > 1:
                    repeated[block_id] = min(bs, seq.num_computed_tokens - index * bs)
        duplicates = sum((self.bm.blocks[b].ref_cnt - 1) * n for b, n in repeated.items())
        return sum(seq.num_computed_tokens for seq in running) - duplicates

    def saved_blocks(self, running: list[Sequence]) -> int:
        """Extra references to shared blocks: what independent copies would need on top."""
        return sum(len(seq.block_table) for seq in running) - (self.bm.num_blocks - self.bm.num_free_blocks)


class ContiguousMemory:
    """KV memory as kv_tokens // max_model_len slots; a sequence holds a whole slot from admission."""

    def __init__(self, kv_tokens: int, max_model_len: int):
        self.max_model_len = max_model_len
        self.num_slots = kv_tokens // max_model_len
        self.held = 0

    def admit(self, seqs: list[Sequence], fresh: bool) -> bool:
        if self.held + len(seqs) > self.num_slots:
            return False
        self.held += len(seqs)
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens
        return True

    def problem(self, req: TraceRequest) -> str | None:
        """Why req could never be admitted or finished with these slots, or None."""
        if req.input_len + req.output_len > self.max_model_len:
            return f"input + output = {req.input_len + req.output_len} tokens exceed max_model_len {self.max_model_len}"
        if req.n > self.num_slots:
            return f"n = {req.n} samples need {req.n} slots of {self.max_model_len} tokens, there are {self.num_slots}"
        return None

    def grow(self, seq: Sequence) -> bool:
        assert seq.num_tokens <= self.max_model_len, f"{seq} outgrew its max_model_len slot"
        seq.num_computed_tokens += 1
        return True

    def free(self, seq: Sequence) -> None:
        self.held -= 1
        seq.num_computed_tokens = 0

    def reserved_tokens(self) -> int:
        return self.held * self.max_model_len

    def used_tokens(self, running: list[Sequence]) -> int:
        return sum(seq.num_computed_tokens for seq in running)

    def saved_blocks(self, running: list[Sequence]) -> int:
        return 0


# ---- the replay -----------------------------------------------------------------------------------
@dataclass
class Waiting:
    seqs: list[Sequence]   # admitted together
    fresh: bool            # a new request (may fork), or a preempted sequence to recompute


class Replay:
    """Drive one memory through a trace, one step (one token per running sequence) at a time."""

    def __init__(self, trace: list[TraceRequest], memory, step_s: float, max_num_seqs: int = 256):
        self.memory = memory
        self.step_s = step_s
        self.max_num_seqs = max_num_seqs
        self.arrivals = deque(sorted(trace, key=lambda r: r.arrival))
        self.queue: deque[Waiting] = deque()
        self.running: list[Sequence] = []
        self.targets: dict[int, int] = {}   # seq_id -> tokens held when it finishes
        self.step_index = 0                 # steps taken so far; step i runs at time i * step_s
        self.num_preemptions = 0
        self.record = StepRecord()
        self._prefixes: dict[str, int] = {}
        self._next_token = 0
        self._num_requests = 0
        for req in self.arrivals:
            problem = memory.problem(req) or (f"n = {req.n} exceeds max_num_seqs {max_num_seqs}"
                                             if req.n > max_num_seqs else None)
            if problem:
                raise TraceError(f"a request arriving at {req.arrival:g} s can never run: {problem}")

    def done(self) -> bool:
        return not (self.arrivals or self.queue or self.running)

    def run(self) -> StepRecord:
        while not self.done():
            self.step()
        return self.record

    def step(self) -> None:
        """One step: finish, grow, admit, record. Idle time before the next arrival is skipped."""
        if not (self.queue or self.running) and self.arrivals:
            self.step_index = max(self.step_index, math.ceil(self.arrivals[0].arrival / self.step_s - 1e-9))
        self._finish()
        self._grow()
        self._arrive()
        self._admit()
        self._record()
        self.step_index += 1

    def _finish(self) -> None:
        for seq in [s for s in self.running if s.num_tokens >= self.targets[s.seq_id]]:
            self.running.remove(seq)
            self.memory.free(seq)
            del self.targets[seq.seq_id]

    def _grow(self) -> None:
        for seq in list(self.running):
            if seq not in self.running:  # preempted below, as a victim
                continue
            seq.append_token(self._token())
            while not self.memory.grow(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.memory.free(seq)   # its tokens are kept: recomputed when it is admitted again
        self.queue.appendleft(Waiting([seq], fresh=False))
        self.num_preemptions += 1

    def _arrive(self) -> None:
        now = self.step_index * self.step_s
        while self.arrivals and self.arrivals[0].arrival <= now + 1e-9:
            self.queue.append(self._make_request(self.arrivals.popleft()))

    def _admit(self) -> None:
        while self.queue and len(self.running) + len(self.queue[0].seqs) <= self.max_num_seqs:
            waiting = self.queue[0]
            if not self.memory.admit(waiting.seqs, waiting.fresh):
                break
            self.queue.popleft()
            self.running.extend(waiting.seqs)

    def _record(self) -> None:
        rec = self.record
        rec.time_s.append(self.step_index * self.step_s)
        rec.reserved_tokens.append(self.memory.reserved_tokens())
        rec.used_tokens.append(self.memory.used_tokens(self.running))
        rec.running_requests.append(len({seq.request_id for seq in self.running}))
        rec.saved_blocks.append(self.memory.saved_blocks(self.running))

    def _make_request(self, req: TraceRequest) -> Waiting:
        rid = f"req-{self._num_requests}"
        self._num_requests += 1
        if req.prefix_id is not None:
            index = self._prefixes.setdefault(req.prefix_id, len(self._prefixes))
            prompt = [_PREFIX_BASE + (index << 20) + i for i in range(req.prefix_len)]
        else:
            prompt = []
        prompt += [self._token() for _ in range(req.input_len - len(prompt))]
        seqs = [Sequence(rid, prompt, _PARAMS, index=i) for i in range(req.n)]
        for seq in seqs:
            self.targets[seq.seq_id] = req.input_len + req.output_len
        return Waiting(seqs, fresh=True)

    def _token(self) -> int:
        """A token id nobody else has (prompts and outputs never match across requests by accident)."""
        self._next_token += 1
        return self._next_token


def summarize_replay(record: StepRecord, block_size: int | None = None) -> dict:
    """Waste (reserved tokens holding no K/V) as % of reserved: the mean over the steps that reserve
    anything, and the mean over the steps at peak reservation (the most reserved, e.g. memory full);
    peak and mean concurrent requests; drain time.
    With block_size, also the blocks that sharing saved (mean, peak, and % of what copies would need)."""
    reserved = np.asarray(record.reserved_tokens, dtype=np.float64)  # [S]
    used = np.asarray(record.used_tokens, dtype=np.float64)          # [S]
    requests = np.asarray(record.running_requests)                   # [S]
    active = reserved > 0
    waste_pct = 100 * (reserved[active] - used[active]) / reserved[active]
    at_peak = reserved == reserved.max(initial=0)
    summary = {
        "steps": len(reserved), "drain_s": record.time_s[-1] if record.time_s else 0.0,
        "waste_mean_pct": float(waste_pct.mean()) if active.any() else 0.0,
        "waste_peak_pct": float(100 * (1 - used[at_peak] / reserved[at_peak]).mean()) if active.any() else 0.0,
        "peak_reserved_tokens": int(reserved.max(initial=0)), "peak_used_tokens": int(used.max(initial=0)),
        "peak_requests": int(requests.max(initial=0)),
        "mean_requests": float(requests[active].mean()) if active.any() else 0.0,
    }
    if block_size:
        saved = np.asarray(record.saved_blocks, dtype=np.float64)    # [S]
        held = reserved / block_size
        summary.update(saved_blocks_mean=float(saved[active].mean()) if active.any() else 0.0,
                       saved_blocks_peak=int(saved.max(initial=0)),
                       saved_pct=float(100 * saved.sum() / (held.sum() + saved.sum())) if held.sum() else 0.0)
    return summary
