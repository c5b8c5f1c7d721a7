"""LLMEngine: add_request / step / abort, the loop that apps drive themselves.

Each step: the scheduler picks tokens per sequence (an immutable `ScheduledBatch`, which also fixes
the rows that sample), the runner computes them, and `update_from_output`, the one home of post-step
bookkeeping, advances each sequence, names its newly full blocks for the prefix cache, forks the
siblings of a request's first token, samples, appends, and finishes and frees what ended (stop
tokens, length). It emits compact `CoreOutput`s for what moved; the `OutputProcessor`
(engine/output_processor.py) turns them into text, finishes sequences whose stop string appeared
(freed in the same step), and delivers `RequestOutput`s to the caller that owns each request.
Bad requests are refused in add_request with an InvalidRequestError, before anything is queued.

Sharing: a request of n > 1 samples prefills once. Only its first sequence is queued; at the
step where it draws its first token, the other n - 1 fork from it (sharing every prompt
block) and draw theirs from the same logits row, each with its own generator. A beam-search
request (engine/beam.py) forks and frees beams every step the same way.

Threads: an LLMEngine is driven by one thread at a time; nothing in it takes a lock. `LLM`
serializes its own calls with a lock, so several threads may share one `LLM`; a server runs the
step loop in one thread and hands add_request / abort to it (docs/architecture.md).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from cupaged.backend import Ops, get_ops
from cupaged.config import EngineConfig, physical_memory
from cupaged.engine.beam import BeamSearch, log_softmax
from cupaged.engine.block_manager import BlockManager
from cupaged.engine.model_runner import ModelRunner, profile_forward
from cupaged.engine.output_processor import CoreOutput, OutputProcessor, RequestQueue, core_output_of
from cupaged.engine.prefix_cache import PrefixCacheStats
from cupaged.engine.sampler import Sampler
from cupaged.engine.scheduler import ScheduledBatch, Scheduler
from cupaged.engine.sequence import Sequence
from cupaged.errors import InvalidRequestError, OutOfMemoryError
from cupaged.model.config import ModelConfig
from cupaged.model.llama import LlamaModel
from cupaged.model.loader import load_model_weights
from cupaged.model.tokenizer import IncrementalDetokenizer, Tokenizer
from cupaged.outputs import RequestOutput
from cupaged.sampling_params import SamplingParams
from cupaged.util import cdiv
from cupaged.validation import cache_salt_of, parse_prompt
from cupaged.weights.store import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """The core's side of a request: its sequences (the output side lives in the OutputProcessor)."""

    request_id: str
    seqs: list[Sequence]                # the n samples: seqs[0] prefills, the others fork from it
    search: BeamSearch | None = None    # beam search: its live beams and finished hypotheses

    def live_seqs(self) -> list[Sequence]:
        """The sequences that may hold blocks (or will, once forked)."""
        return [seq for seq in (self.search.beams if self.search else self.seqs) if not seq.is_finished]


class LLMEngine:
    def __init__(self, config: EngineConfig, ops: Ops | None = None):
        """ops: a ready backend instance (e.g. CudaOps with a chosen device); default get_ops(config.backend)."""
        self.config = config
        self.model_dir = resolve_model(config.model, progress=config.progress)
        cfg = self.model_config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.ops = ops if ops is not None else get_ops(config.backend, config.dtype)
        self.model = LlamaModel(cfg, self.ops, load_model_weights(self.model_dir, cfg))
        if config.max_model_len is not None and config.max_model_len > cfg.max_position:
            raise InvalidRequestError(f"max_model_len {config.max_model_len} is longer than the model's context "
                                      f"(max_position_embeddings {cfg.max_position} in {self.model_dir / 'config.json'})")
        self.max_model_len = config.max_model_len or cfg.max_position
        num_blocks, num_host_blocks = self._num_blocks(), self._num_host_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, num_host_blocks,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   preemption_mode=config.preemption_mode,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        self.runner = ModelRunner(self.model, self.ops, num_blocks, config.block_size,
                                  num_host_blocks=num_host_blocks)
        if not config.enforce_eager:
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.sampler = Sampler(config.seed, self.ops)
        self.eos_token_ids = set(cfg.eos_token_ids) | self.tokenizer.eos_token_ids
        self.requests: dict[str, Request] = {}
        self._searches: set[str] = set()  # requests that run a beam search
        self._unforked: set[str] = set()  # requests of n > 1 samples whose siblings have not forked yet
        self.outputs = OutputProcessor(self.tokenizer)
        self._failed: list[tuple[str, Exception]] = []  # (request id, why) of requests failed this step
        self._ids = itertools.count()
        logger.info("engine ready: %s on %s, %d KV blocks (%d tokens), max_model_len %d",
                    cfg.model_type, self.ops.name, num_blocks, num_blocks * config.block_size, self.max_model_len)

    def _num_blocks(self) -> int:
        """KV blocks that fit the budget: kv_cache_memory when given, else what the backend measures
        (CUDA: a profiling forward against gpu_memory_utilization), else 0.1 of RAM."""
        cfg, bs = self.config, self.config.block_size
        budget = None
        if cfg.kv_cache_memory is None and cfg.kv_cache_fraction is None:
            budget = self.ops.profile_kv_budget(
                lambda: profile_forward(self.model, self.ops, bs, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                        self.max_model_len), cfg.gpu_memory_utilization)
        knob = ("kv_cache_fraction" if cfg.kv_cache_fraction is not None else "kv_cache_memory") if budget is None \
            else "gpu_memory_utilization"
        budget = cfg.kv_cache_bytes() if budget is None else budget
        self._check_fits(budget, knob)
        per_block = bs * self.model_config.kv_bytes_per_token(self.ops.itemsize)
        num_blocks = budget // per_block
        if num_blocks * bs < self.max_model_len:
            need = cdiv(self.max_model_len, bs) * per_block
            raise OutOfMemoryError(
                f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num_blocks * bs} tokens, but one sequence "
                f"of max_model_len {self.max_model_len} needs {need / 2**20:.1f} MiB: raise {knob} "
                f"or lower max_model_len")
        logger.info("KV pool: %d blocks of %d tokens (%.1f MiB): %.1f sequences of max_model_len %d at once",
                    num_blocks, bs, num_blocks * per_block / 2**20, num_blocks * bs / self.max_model_len,
                    self.max_model_len)
        return int(num_blocks)

    def _check_fits(self, budget: int, knob: str) -> None:
        """A pool the memory it lives in cannot hold is refused now, not when the OS kills the process."""
        device = getattr(self.ops, "device", None)
        info = device.memory_info() if device is not None else None
        where, total = ("device", info[1]) if info else ("host", physical_memory())
        if budget > 0.9 * total:
            raise OutOfMemoryError(f"{knob} asks for a {budget / 2**30:.1f} GiB KV pool, more than 90% of the "
                                   f"{total / 2**30:.1f} GiB of {where} memory it would live in")

    def _num_host_blocks(self) -> int:
        """Blocks of the swap pool: swap_space over the size of one block (0 unless preemption_mode is "swap")."""
        per_block = self.config.block_size * self.model_config.kv_bytes_per_token(self.ops.itemsize)
        num_host_blocks = self.config.swap_space_bytes() // per_block
        if self.config.preemption_mode == "swap" and num_host_blocks == 0:
            logger.warning("swap_space %s GiB holds no KV block: every preemption will recompute",
                           self.config.swap_space)
        return int(num_host_blocks)

    # --- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    cache_salt: str | None = None, queue: RequestQueue | None = None) -> str:
        """Queue a prompt (text, token ids, or {"prompt": ..., "prompt_token_ids": [...], "cache_salt": ...}).
        Requests with different cache salts (the dict's own, else `cache_salt`) never share cached
        K/V blocks. With a `queue`, the request's outputs go there and only there; without one, step()
        returns them. Returns the request id."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests or self.outputs.has(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if params.best_of > self.config.max_num_seqs:
            raise InvalidRequestError(f"n / best_of {params.best_of} is more sequences than max_num_seqs "
                                      f"{self.config.max_num_seqs} lets run at once")
        text, ids = parse_prompt(prompt, self.tokenizer, self.model_config.vocab_size, self.max_model_len)
        salt = cache_salt_of(prompt, cache_salt)
        logger.debug("request %s: %d prompt tokens", request_id, len(ids))
        seqs = [Sequence(request_id, ids, params, index=i, cache_salt=salt)
                for i in range(1 if params.use_beam_search else params.n)]
        for seq in seqs:
            seq.set_limits(self.eos_token_ids, self.max_model_len)
        req = self.requests[request_id] = Request(request_id, seqs)
        if len(seqs) > 1:
            self._unforked.add(request_id)
        if params.use_beam_search:
            self._searches.add(request_id)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop_strings, params.skip_special_tokens)
            req.search = BeamSearch(seqs[0], detok, self.eos_token_ids, self.max_model_len)
        self.outputs.add(request_id, text, ids, params, queue)
        self.scheduler.add(seqs[0])  # the others fork from it at its first token
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free every block it holds (device or, if swapped out, host). A request
        with a queue gets a last output there, finish_reason "abort"."""
        request_id = str(request_id)
        req = self._drop(request_id)
        for seq in req.live_seqs() if req else []:
            self._finish(seq, "abort")
        self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def is_finished(self, request_id: str) -> bool:
        """Whether a request has ended (finished, aborted, or never added): no step will move it."""
        return str(request_id) not in self.requests

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache counters since start-up, in tokens: `.queries` (looked up at admission),
        `.hits` (reused instead of computed) and `.hit_rate`. All zero when caching is off."""
        return self.block_manager.prefix_cache_stats()

    # --- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch. Returns the outputs of the requests added without a queue that
        moved; queued requests get theirs in their queue."""
        batch = self.scheduler.schedule()
        self._failed = []
        if not batch.seqs:
            self.runner.move_blocks(batch)  # a step may only swap out (each victim is saved all the same)
            core = []
        else:
            core = self.update_from_output(batch, self.runner.run(batch))
        returned, stopped, failed = self.outputs.process(core)
        for request_id, index in stopped:  # a stop string: finished and freed in this same step
            req = self.requests.get(request_id)
            if req is not None:
                self._finish(req.seqs[index], "stop")
                self._forget_if_done(req)
        for request_id, exc in self._failed + failed:
            out = self.fail_request(request_id, exc)
            if out is not None:
                returned.append(out)
        return returned

    def fail_request(self, request_id: str, exc: Exception) -> RequestOutput | None:
        """A request that failed inside a step ends alone: finish_reason "error" with the message on its
        last output, its blocks freed; every other request goes on."""
        logger.error("request %s failed in a step and was finished with an error: %s: %s", request_id,
                     type(exc).__name__, exc, exc_info=exc)
        req = self._drop(request_id)
        for seq in req.live_seqs() if req else []:
            self._finish(seq, "error")
        return self.outputs.abort(request_id, "error", f"request {request_id} failed: {type(exc).__name__}: {exc}")

    def update_from_output(self, batch: ScheduledBatch, logits) -> list[CoreOutput]:
        """All post-step bookkeeping, in order: advance what was computed and name newly full blocks,
        fork the siblings of first tokens, sample, append, finish and free what ended. logits [S, V]:
        row r for batch.seqs[batch.sample_rows[r]]. Returns what moved."""
        bm, bs = self.block_manager, self.block_manager.block_size
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens // bs > seq.num_cached_blocks:  # a block became full
                bm.cache_full_blocks(seq)
        rows = batch.sample_rows
        sampled = batch.seqs if len(rows) == len(batch.seqs) else [batch.seqs[i] for i in rows]
        if not self._searches:
            return self._draw(logits, sampled, range(len(sampled)))
        beams = [r for r, seq in enumerate(sampled) if seq.params.use_beam_search]
        draws = [r for r, seq in enumerate(sampled) if not seq.params.use_beam_search]
        return self._draw(logits, sampled, draws) + self._search(logits, sampled, beams)

    def _draw(self, logits, sampled: list[Sequence], rows) -> list[CoreOutput]:
        """Sample the next token of sampled[r] for r in rows; a first token forks the request's siblings,
        which draw from the same row."""
        if not self._unforked and len(rows) == len(sampled):  # no first token to fork from: every row draws once
            seqs, picks = sampled, rows
        else:
            seqs, picks = self._with_siblings(sampled, rows)
        if not seqs:
            return []
        if len(picks) != len(sampled) or picks[-1] != len(sampled) - 1:
            logits = self.ops.take_rows(logits, picks)  # [len(seqs), V]
        try:
            tokens, logprobs = self.sampler.sample(logits, seqs)
        except Exception:  # one row's sampling failed the batch: sample each alone, fail only the culprits
            return self._draw_each(logits, seqs)
        return [self._append(seq, token, lp) for seq, token, lp in zip(seqs, tokens, logprobs)]

    def _with_siblings(self, sampled: list[Sequence], rows) -> tuple[list[Sequence], list[int]]:
        """The sequences that draw and the row each draws from: sampled[r] for r in rows, where a
        request's first token also forks its siblings, which draw from the same row."""
        seqs, picks = [], []
        for r in rows:
            seq = sampled[r]
            family = self._fork_siblings(seq) if seq.params.n > 1 and seq.num_output_tokens == 0 else None
            if family:
                seqs += family
                picks += [r] * len(family)
            else:
                seqs.append(seq)
                picks.append(r)
        return seqs, picks

    def _draw_each(self, logits, seqs: list[Sequence]) -> list[CoreOutput]:
        """The slow path after a failed sample: row by row; a row that fails again fails its request."""
        moved = []
        for row, seq in enumerate(seqs):
            if seq.request_id in {rid for rid, _ in self._failed}:
                continue
            try:
                tokens, logprobs = self.sampler.sample(self.ops.take_rows(logits, [row]), [seq])
            except Exception as exc:
                self._failed.append((seq.request_id, exc))
                continue
            moved.append(self._append(seq, tokens[0], logprobs[0]))
        return moved

    def _fork_siblings(self, seq: Sequence) -> list[Sequence]:
        """At the first token of a request's first sample, the other samples fork from it: they share
        its prompt blocks (the partly filled last one is copied on its first write). Returns the family."""
        req = self.requests[seq.request_id]
        if seq is not req.seqs[0]:
            return []
        self._unforked.discard(seq.request_id)
        for child in req.seqs[1:]:
            self._fork(seq, child)
        return req.seqs

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks and runs from the next step on."""
        self.block_manager.fork(parent, child)
        self.scheduler.add_running(child)

    def _append(self, seq: Sequence, token: int, logprobs) -> CoreOutput:
        if logprobs is None:
            seq.token_ids.append(token)  # Sequence.append_token, inlined for the common case
        else:
            seq.append_token(token, logprobs)
        stop_token = token in seq.stop_ids
        reason = "stop" if stop_token else "length" if len(seq.token_ids) >= seq.max_len else None
        if reason:
            self._finish(seq, reason)
            self._forget_if_done(self.requests[seq.request_id])
        if logprobs is None:
            return core_output_of((seq.request_id, seq.index, [token], None, reason, stop_token, None, None))
        return CoreOutput(seq.request_id, seq.index, [token], [logprobs], reason, stop_token, seq.cumulative_logprob)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq)

    def _forget_if_done(self, req: Request) -> None:
        if all(seq.is_finished for seq in req.seqs):
            self._drop(req.request_id)

    def _drop(self, request_id: str) -> Request | None:
        """Forget a request (the core's side): it has ended."""
        self._searches.discard(request_id)
        self._unforked.discard(request_id)
        return self.requests.pop(request_id, None)

    def _search(self, logits, sampled: list[Sequence], rows: list[int]) -> list[CoreOutput]:
        """Give beams sampled[r] (r in rows) their next-token log-probs; step every search whose beams
        all have theirs. Returns the final outputs of the searches that ended."""
        if not rows:
            return []
        host = self.ops.to_numpy(self.ops.take_rows(logits, rows))
        logprobs = log_softmax(host)  # [len(rows), V] float64
        reqs = {}
        for row, r in enumerate(rows):
            req = reqs[sampled[r].request_id] = self.requests[sampled[r].request_id]
            req.search.offer(sampled[r], logprobs[row])
        done = []
        for req in reqs.values():
            try:
                if req.search.ready():
                    self._step_search(req)
                    if req.search.done:
                        done.append(self._search_output(req))
            except Exception as exc:  # this search alone ends
                self._failed.append((req.request_id, exc))
        return done

    def _step_search(self, req: Request) -> None:
        go_on, retired = req.search.step(self._update_beam_text)
        for child, beam in go_on:  # fork before the old beams let go of their blocks
            self._fork(beam, child)
        for beam in retired:
            self.scheduler.finish(beam, "beam")

    def _search_output(self, req: Request) -> CoreOutput:
        """A beam search's one output, when it ends: the best n hypotheses, best first."""
        p = req.seqs[0].params
        self._drop(req.request_id)
        hypotheses = [(seq.output_token_ids, seq.logprobs if p.logprobs is not None else None,
                       seq.cumulative_logprob, seq.finish_reason, detok) for seq, detok in req.search.best(p.n)]
        return CoreOutput(req.request_id, 0, [], hypotheses=hypotheses)

    def _update_beam_text(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> str | None:
        """Add the token just appended to a beam candidate to its text; return why it stops, if it does."""
        if self._is_stop_token(seq, token):  # as in vLLM, a stop token's text is not returned
            return "stop"
        detok.add(token)
        return "stop" if detok.stopped else self._length_reason(seq)

    @staticmethod
    def _length_reason(seq: Sequence) -> str | None:
        return "length" if len(seq.token_ids) >= seq.max_len else None

    @staticmethod
    def _is_stop_token(seq: Sequence, token: int) -> bool:
        return token in seq.stop_ids
