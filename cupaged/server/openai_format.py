"""OpenAI's request fields -> SamplingParams, and RequestOutputs -> OpenAI's response and chunk objects
(the shapes of the `openai` package's types: Completion, ChatCompletion, ChatCompletionChunk)."""
from __future__ import annotations

import time
import uuid

from cupaged.errors import InvalidRequestError
from cupaged.model.tokenizer import Tokenizer
from cupaged.outputs import CompletionOutput, RequestOutput
from cupaged.sampling_params import SamplingParams
from cupaged.server.protocol import ChatRequest, CompletionRequest

MAX_LOGPROBS = 20


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req: CompletionRequest | ChatRequest) -> SamplingParams:
    """The request's sampling fields as SamplingParams (outputs as deltas); InvalidRequestError names a
    bad one. A chat's max_completion_tokens wins over its max_tokens."""
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
    else:
        logprobs = req.logprobs
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    fields = dict(n=req.n, max_tokens=max_tokens, stop=req.stop, seed=req.seed, logprobs=logprobs,
                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                  ignore_eos=req.ignore_eos, stop_token_ids=req.stop_token_ids, output_kind="delta")
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    return SamplingParams(**fields)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Logprobs:
    """Engine log-probs ({token id: log-prob}, chosen token first) in OpenAI's two shapes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def ranked(position: dict[int, float], top: int) -> list[tuple[int, float]]:
        """The top alternatives of one position, best first (the engine's dict holds the chosen token and
        the top ones, so its `top` best are the top ones whether or not the chosen is among them)."""
        return sorted(position.items(), key=lambda kv: -kv[1])[:top]

    def completion(self, out: CompletionOutput, text_offset: int, top: int) -> dict | None:
        """Completions' shape: tokens, token_logprobs, top_logprobs, text_offset."""
        if out.logprobs is None:
            return None
        shape = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, position in zip(out.token_ids, out.logprobs):
            text = self.token(token_id)
            shape["tokens"].append(text)
            shape["token_logprobs"].append(position[token_id])
            shape["top_logprobs"].append({self.token(t): lp for t, lp in self.ranked(position, top)})
            shape["text_offset"].append(text_offset)
            text_offset += len(text)
        return shape

    def chat(self, out: CompletionOutput, top: int) -> dict | None:
        """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
        if out.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token_id, position in zip(out.token_ids, out.logprobs):
            content.append({**entry(token_id, position[token_id]),
                            "top_logprobs": [entry(t, lp) for t, lp in self.ranked(position, top)]})
        return {"content": content}


def completion_choice(index: int, out: CompletionOutput, logprobs: dict | None) -> dict:
    return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}


def chat_choice(index: int, out: CompletionOutput, logprobs: dict | None, delta: bool, first: bool) -> dict:
    """A chat choice: a whole `message`, or a streamed `delta` (the first carries the role)."""
    if not delta:
        return {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs,
                "finish_reason": out.finish_reason}
    body = {"role": "assistant", "content": out.text} if first else {"content": out.text}
    return {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": out.finish_reason}


def envelope(kind: str, request_id: str, model: str, created: int, choices: list, usage_: dict | None = None) -> dict:
    """kind: "text_completion", "chat.completion" or "chat.completion.chunk"."""
    body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None or kind != "chat.completion.chunk":
        body["usage"] = usage_
    return body


def now() -> int:
    return int(time.time())


def completion_tokens(outs: list[RequestOutput]) -> int:
    return sum(len(o.token_ids) for out in outs for o in out.outputs)
