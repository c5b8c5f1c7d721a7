"""LLM: the offline API, shaped like vLLM's.

    >>> from cupaged import LLM, SamplingParams
    >>> llm = LLM(model="smollm2-135m-instruct")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].outputs[0].text
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence

from cupaged.backend.ops import Ops
from cupaged.config import EngineConfig
from cupaged.engine.engine import LLMEngine
from cupaged.errors import InvalidRequestError
from cupaged.engine.output_processor import RequestQueue
from cupaged.outputs import RequestOutput
from cupaged.sampling_params import SamplingParams
from cupaged.validation import check_messages, is_int


def make_engine(model: str | None = None, backend: str | Ops = "auto", **kwargs) -> LLMEngine:
    """An LLMEngine from LLM's arguments: a model name or path (None: the default model), a backend
    name or a ready `Ops`, and EngineConfig fields by name (an unknown one is refused by name)."""
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise InvalidRequestError(f"unknown engine option(s) {', '.join(unknown)} (EngineConfig's fields are "
                                  f"{', '.join(fields)})")
    ops = backend if isinstance(backend, Ops) else None
    config = EngineConfig(model=EngineConfig.model if model is None else model,
                          backend=ops.name if ops else backend, **kwargs)
    return LLMEngine(config, ops=ops)


class LLM:
    """The offline API. Each call's outputs go to that call only (a queue per request), so generate()
    and any number of interleaved streams can share one engine, and so can threads: every engine call
    is made under one lock."""

    def __init__(self, model: str = EngineConfig.model, backend: str | Ops = "auto", **kwargs):
        """backend: "auto", "cpu", "cuda", or a ready `Ops` instance. kwargs are EngineConfig fields:
        dtype, block_size, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, max_model_len,
        kv_cache_memory, gpu_memory_utilization, enforce_eager, seed, progress, enable_prefix_caching
        (default True), preemption_mode ("recompute" or "swap"), swap_space (GiB of host memory for
        swapped-out KV blocks)."""
        self.engine = make_engine(model, backend, **kwargs)
        self.tokenizer = self.engine.tokenizer
        self._lock = threading.RLock()

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 cache_salt: str | None = None) -> list[RequestOutput]:
        """prompts: a string, token-id dict, or a list of them. Returns one RequestOutput each, in order.
        cache_salt: for prompts without their own "cache_salt"; different salts never share cached K/V.
        If anything interrupts it (an exception, KeyboardInterrupt), its requests are aborted."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError(f"prompts must be a str, a dict or a list of prompts, got {type(prompts).__name__}")
        if prompts and all(is_int(p) for p in prompts):
            raise InvalidRequestError("prompts is a list of ints: pass token ids as [[...]] (one prompt) or "
                                      "{'prompt_token_ids': [...]}")
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for p in params_list:
            if p is not None and not isinstance(p, SamplingParams):
                raise InvalidRequestError(f"params must be SamplingParams (or a list of them), got {type(p).__name__}")
        final = [dataclasses.replace(p or SamplingParams(), output_kind="final") for p in params_list]
        queues = [RequestQueue() for _ in prompts]
        ids: list[str] = []
        try:
            with self._lock:  # a bad prompt refuses the whole call and leaves nothing queued
                for prompt, p, q in zip(prompts, final, queues):
                    ids.append(self.engine.add_request(None, prompt, p, cache_salt=cache_salt, queue=q))
            while not all(q.finished for q in queues):
                self._step()
        except BaseException:
            self._abort(ids, queues)
            raise
        return [q.get() for q in queues]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]."""
        return self.generate(self.chat_prompt(messages), params)[0]

    def chat_prompt(self, messages: list[dict]) -> dict:
        text = self.tokenizer.apply_chat_template(check_messages(messages), add_generation_prompt=True)
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as they are generated (of output 0 when n > 1).
        Closing the generator early aborts the request and frees its blocks."""
        for out in self.stream_outputs(prompt, params):
            if out.outputs[0].delta:
                yield out.outputs[0].delta

    def stream_outputs(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the RequestOutput of one prompt after every step that moved it (`.outputs[i].delta`
        holds the new text), ending with its finished one, also when it is aborted elsewhere
        (finish_reason "abort"). Closing early aborts the request."""
        queue = RequestQueue()
        with self._lock:
            rid = self.engine.add_request(None, prompt, params, queue=queue)
        try:
            while True:
                out = queue.get()
                if out is None:
                    self._step()
                    continue
                yield out
                if out.finished:
                    return
        finally:
            if not queue.finished:
                self._abort([rid], [queue])

    def _step(self) -> None:
        with self._lock:
            self.engine.step()  # the requests of LLM's callers have queues: step() returns nothing of theirs

    def _abort(self, ids: list[str], queues: list[RequestQueue]) -> None:
        with self._lock:
            for rid, q in zip(ids, queues):
                if not q.finished:
                    self.engine.abort(rid)
