"""LLMEngine: add_request / step / abort, the loop that apps drive themselves.

Each step: the scheduler picks tokens per sequence, the runner computes them, the sampler
picks next tokens for sequences that reached their end, and finished sequences give their
blocks back. Bad requests are refused in add_request with an InvalidRequestError, before
anything is queued, so the requests already running never notice.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from cupaged.backend import Ops, get_ops
from cupaged.config import EngineConfig
from cupaged.engine.block_manager import BlockManager
from cupaged.engine.model_runner import ModelRunner
from cupaged.engine.prefix_cache import PrefixCacheStats
from cupaged.engine.sampler import Sampler
from cupaged.engine.scheduler import Scheduler
from cupaged.engine.sequence import Sequence
from cupaged.errors import InvalidRequestError, OutOfMemoryError
from cupaged.model.config import ModelConfig
from cupaged.model.llama import LlamaModel
from cupaged.model.loader import load_model_weights
from cupaged.model.tokenizer import IncrementalDetokenizer, Tokenizer
from cupaged.outputs import CompletionOutput, RequestOutput
from cupaged.sampling_params import SamplingParams
from cupaged.weights.store import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]


class LLMEngine:
    def __init__(self, config: EngineConfig, ops: Ops | None = None):
        """ops: a ready backend instance (e.g. CudaOps with a chosen device); default get_ops(config.backend)."""
        self.config = config
        self.model_dir = resolve_model(config.model, progress=config.progress)
        cfg = self.model_config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.ops = ops if ops is not None else get_ops(config.backend, config.dtype)
        self.model = LlamaModel(cfg, self.ops, load_model_weights(self.model_dir, cfg))
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        num_blocks = self._num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.ops, num_blocks, config.block_size)
        self.sampler = Sampler(config.seed, self.ops)
        self.eos_token_ids = set(cfg.eos_token_ids) | self.tokenizer.eos_token_ids
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        logger.info("engine ready: %s on %s, %d KV blocks (%d tokens), max_model_len %d",
                    cfg.model_type, self.ops.name, num_blocks, num_blocks * config.block_size, self.max_model_len)

    def _num_blocks(self) -> int:
        bs, budget = self.config.block_size, self.config.kv_cache_bytes()
        per_block = bs * self.model_config.kv_bytes_per_token(self.ops.itemsize)
        num_blocks = budget // per_block
        if num_blocks * bs < self.max_model_len:
            need = -(-self.max_model_len // bs) * per_block
            raise OutOfMemoryError(
                f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num_blocks * bs} tokens, but one sequence "
                f"of max_model_len {self.max_model_len} needs {need / 2**20:.1f} MiB: raise kv_cache_memory "
                f"or lower max_model_len")
        return int(num_blocks)

    # --- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    cache_salt: str | None = None) -> str:
        """Queue a prompt (text, token ids, or {"prompt": ..., "prompt_token_ids": [...], "cache_salt": ...}).
        Requests with different cache salts (the dict's own, else `cache_salt`) never share cached
        K/V blocks. Returns the request id."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        salt = self._cache_salt(prompt, cache_salt)
        logger.debug("request %s: %d prompt tokens", request_id, len(ids))
        seqs = [Sequence(request_id, ids, params, index=i, cache_salt=salt) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.stop_strings, params.skip_special_tokens)
                  for _ in seqs]
        self.requests[request_id] = Request(request_id, text, ids, seqs, detoks)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if ids is None and text is None:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            if ids is None:
                ids = self.tokenizer.encode(text)
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt) if prompt else []
        else:
            text, ids = None, prompt
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens, but the context length is {self.max_model_len} "
                f"(the prompt must leave room for at least one generated token)")
        return text, ids

    @staticmethod
    def _cache_salt(prompt, default: str | None) -> str | None:
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        salt = default if salt is None else salt
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise InvalidRequestError(f"cache_salt must be a non-empty string, got {salt!r}")
        return salt

    def abort(self, request_id: str) -> None:
        """Stop a request now and free every block it holds."""
        req = self.requests.pop(str(request_id), None)
        for seq in req.seqs if req else []:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                self.sampler.forget(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache counters since start-up, in tokens: `.queries` (looked up at admission),
        `.hits` (reused instead of computed) and `.hit_rate`. All zero when caching is off."""
        return self.block_manager.prefix_cache_stats()

    # --- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of requests that moved."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        logits = self.runner.run(batch)
        sampled = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
        tokens, logprobs = self.sampler.sample(logits, sampled) if sampled else ([], [])
        moved = {}
        for seq, token, lp in zip(sampled, tokens, logprobs):
            self._append(seq, token, lp)
            moved[seq.request_id] = self.requests[seq.request_id]
        return [self._output(req) for req in moved.values()]

    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        seq.append_token(token, logprobs)
        detok = self.requests[seq.request_id].detoks[seq.index]
        if not self._is_stop_token(seq, token):  # as in vLLM, a stop token's text is not returned
            detok.add(token)
        reason = self._finish_reason(seq, token, detok)
        if reason:
            self.scheduler.finish(seq, reason)
            self.sampler.forget(seq)

    def _finish_reason(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> str | None:
        p = seq.params
        if self._is_stop_token(seq, token) or detok.stopped:
            return "stop"
        if (p.max_tokens and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        return (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids

    def _output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(seq.index, d.text, seq.output_token_ids,
                                 seq.logprobs if seq.params.logprobs is not None else None, seq.finish_reason,
                                 delta=d.delta(final=seq.is_finished))
                for seq, d in zip(req.seqs, req.detoks)]
        finished = all(seq.is_finished for seq in req.seqs)
        if finished:
            del self.requests[req.request_id]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished)
