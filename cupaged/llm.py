"""LLM: the offline API, shaped like vLLM's.

    >>> from cupaged import LLM, SamplingParams
    >>> llm = LLM(model="smollm2-135m-instruct")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].outputs[0].text
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from cupaged.backend.ops import Ops
from cupaged.config import EngineConfig
from cupaged.engine.engine import LLMEngine
from cupaged.outputs import RequestOutput
from cupaged.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = EngineConfig.model, backend: str | Ops = "auto", **kwargs):
        """backend: "auto", "cpu", "cuda", or a ready `Ops` instance. kwargs are EngineConfig fields:
        dtype, block_size, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, max_model_len,
        kv_cache_memory, gpu_memory_utilization, enforce_eager, seed, progress, enable_prefix_caching
        (default True), preemption_mode ("recompute" or "swap"), swap_space (GiB of host memory for
        swapped-out KV blocks)."""
        ops = backend if isinstance(backend, Ops) else None
        config = EngineConfig(model=model, backend=ops.name if ops else backend, **kwargs)
        self.engine = LLMEngine(config, ops=ops)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 cache_salt: str | None = None) -> list[RequestOutput]:
        """prompts: a string, token-id dict, or a list of them. Returns one RequestOutput each, in order.
        cache_salt: for prompts without their own "cache_salt"; different salts never share cached K/V."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.engine.add_request(None, prompt, p, cache_salt=cache_salt))
        except Exception:
            for rid in ids:  # a bad prompt refuses the whole call and leaves nothing queued
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]."""
        return self.generate(self.chat_prompt(messages), params)[0]

    def chat_prompt(self, messages: list[dict]) -> dict:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as they are generated (of output 0 when n > 1).
        Closing the generator early aborts the request and frees its blocks."""
        for out in self.stream_outputs(prompt, params):
            if out.outputs[0].delta:
                yield out.outputs[0].delta

    def stream_outputs(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the RequestOutput of one prompt after every step that moved it
        (`.outputs[i].delta` holds the new text). Closing early aborts the request."""
        rid = self.engine.add_request(None, prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)
