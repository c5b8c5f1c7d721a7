"""Replay a request trace through KV memory alone (no model): how much of what is reserved holds K/V.

Paged memory (`SchedulerReplay`) is the engine itself minus the model: its `Scheduler` and
`BlockManager`. Each step the scheduler's batch is taken as computed (prompts admitted while budget,
max_num_seqs and blocks allow; the newest running sequence preempted by recompute when blocks run
out), every sequence that samples gets a fresh token (the first token of an n > 1 request forks its
siblings, which share the prompt's blocks, as LLMEngine does), and a sequence that reaches
input_len + output_len tokens finishes and frees its blocks. share=False gives each sample its own
prompt copy; prefix_caching turns the engine's prefix cache on, its lookups counted by admission
(`ReuseCounts`: first admissions apart from re-admissions after preemption).

Contiguous memory (`ContiguousMemory` through `Replay`) is the counterfactual no engine here runs:
one max_model_len slot reserved per sequence at admission, as engines before PagedAttention did.
Its loop does per step what the scheduler does: finish, grow every running sequence by a token,
admit arrived requests first come first served while slots and max_num_seqs allow. It never preempts.

Recorded per step: tokens reserved, tokens holding a K/V (the tokens computed; a token in a block
shared by several sequences counted once), requests running, and `saved_blocks`, the extra
references to shared blocks (what independent copies would need on top).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cupaged.cli.memory_trace import TraceRequest
from cupaged.engine.block_manager import BlockManager
from cupaged.engine.scheduler import Scheduler
from cupaged.engine.sequence import Sequence
from cupaged.errors import TraceError
from cupaged.sampling_params import SamplingParams
from cupaged.util import cdiv

_PARAMS = SamplingParams(max_tokens=None)
_PREFIX_BASE = 1_000_000_000   # token ids of shared prefixes: base + prefix index * 2^20 + position


@dataclass
class StepRecord:
    """What each replayed step left in memory (lists of one entry per step)."""

    time_s: list[float] = field(default_factory=list)          # the step's time (idle gaps skipped)
    reserved_tokens: list[int] = field(default_factory=list)
    used_tokens: list[int] = field(default_factory=list)
    running_requests: list[int] = field(default_factory=list)
    saved_blocks: list[int] = field(default_factory=list)


class TokenSource:
    """Prompts and tokens nobody else has: requests never match by accident, and those with the same
    prefix_id share exactly their first prefix_len tokens."""

    def __init__(self):
        self._prefixes: dict[str, int] = {}
        self._next = 0

    def token(self) -> int:
        self._next += 1
        return self._next

    def prompt(self, req: TraceRequest) -> list[int]:
        prompt = []
        if req.prefix_id is not None:
            index = self._prefixes.setdefault(req.prefix_id, len(self._prefixes))
            prompt = [_PREFIX_BASE + (index << 20) + i for i in range(req.prefix_len)]
        return prompt + [self.token() for _ in range(req.input_len - len(prompt))]


def check_trace(trace: list[TraceRequest], memory, max_num_seqs: int) -> None:
    """Raise TraceError naming the first request that could never run."""
    for req in trace:
        problem = memory.problem(req) or (f"n = {req.n} exceeds max_num_seqs {max_num_seqs}"
                                         if req.n > max_num_seqs else None)
        if problem:
            raise TraceError(f"a request arriving at {req.arrival:g} s can never run: {problem}")


# ---- paged: the engine's scheduler ------------------------------------------------------------
@dataclass
class ReuseCounts:
    """Prefix-cache lookups split by admission. A first admission looks up the prompt; a re-admission
    after preemption by recompute looks up the prompt and the tokens generated so far, and often finds
    its own blocks still cached, so it would count the same tokens again."""

    first_tokens: int = 0         # prompt tokens looked up at first admissions
    first_reused: int = 0         # of those, found in the cache
    readmissions: int = 0
    readmitted_tokens: int = 0    # prompt + generated tokens looked up at re-admissions
    readmitted_reused: int = 0    # of those, found in the cache

    def add(self, seq: Sequence, sign: int) -> None:
        if seq.num_preemptions == 0:
            self.first_tokens += sign * seq.num_tokens
            self.first_reused += sign * seq.num_computed_tokens
        else:
            self.readmissions += sign
            self.readmitted_tokens += sign * seq.num_tokens
            self.readmitted_reused += sign * seq.num_computed_tokens


class CountingBlockManager(BlockManager):
    """The engine's BlockManager, its prefix-cache lookups also counted by admission (`reuse`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reuse = ReuseCounts()

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        reused = super().reuse_cached_prefix(seq)
        if self.enable_prefix_caching:
            self.reuse.add(seq, +1)
        return reused

    def cancel_reuse(self, seq: Sequence) -> None:
        """The scheduler calls this right after reuse_cached_prefix(seq): seq is unchanged between."""
        if self.enable_prefix_caching:
            self.reuse.add(seq, -1)
        super().cancel_reuse(seq)


class SchedulerReplay:
    """A trace through the engine's Scheduler and BlockManager, one step at a time."""

    def __init__(self, trace: list[TraceRequest], kv_tokens: int, block_size: int, step_s: float,
                 max_num_seqs: int = 256, share: bool = True, prefix_caching: bool = False,
                 max_num_batched_tokens: int | None = None):
        """max_num_batched_tokens: the step's token budget (default kv_tokens: a prompt joins whole)."""
        self.block_size, self.step_s, self.share = block_size, step_s, share
        self.bm = CountingBlockManager(kv_tokens // block_size, block_size, enable_prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens or kv_tokens)
        check_trace(trace, self, max_num_seqs)
        self.arrivals = deque(sorted(trace, key=lambda r: r.arrival))
        self.targets: dict[int, int] = {}                 # seq_id -> tokens it holds when it finishes
        self.siblings: dict[int, list[Sequence]] = {}     # first seq_id -> the samples forked at its first token
        self.forked: set[int] = set()                     # seq_ids that may hold a forked block
        self.step_index = 0
        self.record = StepRecord()
        self.tokens = TokenSource()
        self._num_requests = 0

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def problem(self, req: TraceRequest) -> str | None:
        """Why req could never finish in this pool, or None."""
        blocks = cdiv(req.input_len + req.output_len, self.block_size)
        if blocks > self.bm.num_blocks:
            return f"one sequence needs {blocks} blocks of {self.block_size}, the pool has {self.bm.num_blocks}"
        return None

    def done(self) -> bool:
        return not (self.arrivals or self.scheduler.has_unfinished())

    def run(self) -> StepRecord:
        while not self.done():
            self.step()
        return self.record

    def step(self) -> None:
        """Arrive, schedule, compute (at once), sample, finish, record. Idle time is skipped."""
        if not self.scheduler.has_unfinished() and self.arrivals:
            self.step_index = max(self.step_index, math.ceil(self.arrivals[0].arrival / self.step_s - 1e-9))
        now = self.step_index * self.step_s
        while self.arrivals and self.arrivals[0].arrival <= now + 1e-9:
            self._add(self.arrivals.popleft())
        batch = self.scheduler.schedule()
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.bm.cache_full_blocks(seq)
        for i in batch.sample_rows:
            seq = batch.seqs[i]
            for sample in [seq, *self._fork_siblings(seq)]:
                sample.append_token(self.tokens.token())
                if sample.num_tokens >= self.targets[sample.seq_id]:
                    self.scheduler.finish(sample, "length")
        self._record()
        self.step_index += 1

    def _add(self, req: TraceRequest) -> None:
        rid = f"req-{self._num_requests}"
        self._num_requests += 1
        prompt = self.tokens.prompt(req)
        params = SamplingParams(n=req.n, max_tokens=None) if self.share and req.n > 1 else _PARAMS
        seqs = [Sequence(rid, prompt, params, index=i) for i in range(req.n)]
        for seq in seqs:
            self.targets[seq.seq_id] = req.input_len + req.output_len
        if params.n > 1:
            self.siblings[seqs[0].seq_id] = seqs[1:]
            self.scheduler.add(seqs[0])
        else:
            for seq in seqs:
                self.scheduler.add(seq)

    def _fork_siblings(self, seq: Sequence) -> list[Sequence]:
        """At the first token of an n > 1 request the other samples fork from it (LLMEngine._fork)."""
        children = self.siblings.pop(seq.seq_id, []) if seq.num_output_tokens == 0 else []
        for child in children:
            self.bm.fork(seq, child)
            self.scheduler.add_running(child)
            self.forked.update((seq.seq_id, child.seq_id))
        return children

    def _record(self) -> None:
        rec, running = self.record, self.scheduler.running
        rec.time_s.append(self.step_index * self.step_s)
        held = self.bm.num_blocks - self.bm.num_free_blocks
        rec.reserved_tokens.append(held * self.block_size)
        rec.used_tokens.append(self._used_tokens(running))
        rec.running_requests.append(len({seq.request_id for seq in running}))
        rec.saved_blocks.append(sum(len(seq.block_table) for seq in running) - held)

    def _used_tokens(self, running: list[Sequence]) -> int:
        """Tokens holding K/V, each physical slot once: the computed tokens of every sequence minus
        what shared blocks repeat. Only prompt blocks are ever shared (forks share the prompt's, the
        prefix cache names blocks of shared prefixes; outputs never match)."""
        bs, blocks, caching = self.block_size, self.bm.blocks, self.bm.enable_prefix_caching
        repeated: dict[int, int] = {}  # shared block id -> tokens it holds (its fullest holder's)
        for seq in running:
            if not (caching or seq.seq_id in self.forked):
                continue
            for index, block_id in enumerate(seq.block_table[:cdiv(seq.num_prompt_tokens, bs)]):
                if blocks[block_id].ref_cnt > 1:
                    tokens = min(bs, seq.num_computed_tokens - index * bs)
                    repeated[block_id] = max(repeated.get(block_id, 0), tokens)
        duplicates = sum((blocks[b].ref_cnt - 1) * n for b, n in repeated.items())
        return sum(seq.num_computed_tokens for seq in running) - duplicates


# ---- contiguous: the counterfactual ----------------------------------------------------------
class ContiguousMemory:
    """KV memory as kv_tokens // max_model_len slots; a sequence holds a whole slot from admission."""

    def __init__(self, kv_tokens: int, max_model_len: int):
        self.max_model_len = max_model_len
        self.num_slots = kv_tokens // max_model_len
        self.held = 0

    def admit(self, seqs: list[Sequence]) -> bool:
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


class Replay:
    """Drive a ContiguousMemory through a trace, one step (one token per running sequence) at a time."""

    def __init__(self, trace: list[TraceRequest], memory: ContiguousMemory, step_s: float, max_num_seqs: int = 256):
        check_trace(trace, memory, max_num_seqs)
        self.memory, self.step_s, self.max_num_seqs = memory, step_s, max_num_seqs
        self.arrivals = deque(sorted(trace, key=lambda r: r.arrival))
        self.queue: deque[list[Sequence]] = deque()  # a request's samples, admitted together
        self.running: list[Sequence] = []
        self.targets: dict[int, int] = {}   # seq_id -> tokens held when it finishes
        self.step_index = 0                 # steps taken so far; step i runs at time i * step_s
        self.num_preemptions = 0            # a slot never runs out: always 0
        self.record = StepRecord()
        self.tokens = TokenSource()
        self._num_requests = 0

    def done(self) -> bool:
        return not (self.arrivals or self.queue or self.running)

    def run(self) -> StepRecord:
        while not self.done():
            self.step()
        return self.record

    def step(self) -> None:
        """One step: finish, grow, arrive, admit, record. Idle time before the next arrival is skipped."""
        if not (self.queue or self.running) and self.arrivals:
            self.step_index = max(self.step_index, math.ceil(self.arrivals[0].arrival / self.step_s - 1e-9))
        for seq in [s for s in self.running if s.num_tokens >= self.targets[s.seq_id]]:
            self.running.remove(seq)
            self.memory.free(seq)
            del self.targets[seq.seq_id]
        for seq in self.running:
            seq.append_token(self.tokens.token())
            self.memory.grow(seq)
        now = self.step_index * self.step_s
        while self.arrivals and self.arrivals[0].arrival <= now + 1e-9:
            self.queue.append(self._make_request(self.arrivals.popleft()))
        while self.queue and len(self.running) + len(self.queue[0]) <= self.max_num_seqs:
            if not self.memory.admit(self.queue[0]):
                break
            self.running.extend(self.queue.popleft())
        self._record()
        self.step_index += 1

    def _record(self) -> None:
        rec = self.record
        rec.time_s.append(self.step_index * self.step_s)
        rec.reserved_tokens.append(self.memory.reserved_tokens())
        rec.used_tokens.append(self.memory.used_tokens(self.running))
        rec.running_requests.append(len({seq.request_id for seq in self.running}))
        rec.saved_blocks.append(0)

    def _make_request(self, req: TraceRequest) -> list[Sequence]:
        rid = f"req-{self._num_requests}"
        self._num_requests += 1
        prompt = self.tokens.prompt(req)
        seqs = [Sequence(rid, prompt, _PARAMS, index=i) for i in range(req.n)]
        for seq in seqs:
            self.targets[seq.seq_id] = req.input_len + req.output_len
        return seqs


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
