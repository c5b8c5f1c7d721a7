"""The output side of the engine: the core's compact per-step records -> text -> RequestOutputs, each
delivered to the caller that owns the request.

The engine core emits, per step, a `CoreOutput` only for each sequence that moved: request id, output
index, the new token ids, their log-probabilities where asked, and the finish reason if it finished.
`OutputProcessor.process` turns those into text deltas (O(1) per token: IncrementalDetokenizer in
model/tokenizer.py; stop strings held back and cut), reports the sequences a stop string finishes (the
engine frees them in the same step), and builds a `RequestOutput` only where its request's `output_kind` asks for one:

- "cumulative" (the default, vLLM's): every step that moved it, all text and token ids so far, `delta`
  the new text;
- "delta": every step that moved it, only what is new (`text` = `delta`, `token_ids` the new ids);
- "final": once, when it finishes.

Routing: a request added with a `RequestQueue` gets its outputs in that queue, and no one else sees them;
the outputs of requests added without one are returned by `LLMEngine.step()` to whoever called it (an
app's own add_request / step loop). Abort puts a final output (finish_reason "abort") in the queue, so a
stream whose request ends anywhere sees it end.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from cupaged.model.tokenizer import IncrementalDetokenizer, Tokenizer
from cupaged.outputs import CompletionOutput, RequestOutput
from cupaged.sampling_params import SamplingParams


class CoreOutput(NamedTuple):
    """What one sequence did in one step, as the engine core reports it (a tuple: one is made per
    sequence per step)."""

    request_id: str
    index: int                                   # which of the request's n outputs
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None             # "stop" | "length" | "abort" | None while running
    hidden: bool = False                         # a stop token: counted, its text not returned
    cumulative_logprob: float | None = None
    # beam search, when it ends: its n best hypotheses, best first, as
    # (token ids, logprobs or None, cumulative log-prob, finish reason, detokenizer holding its text)
    hypotheses: list[tuple[list[int], list | None, float, str, IncrementalDetokenizer]] | None = None


# CoreOutput from a tuple of all eight fields, without the Python-level __new__ of a NamedTuple (one is
# made per sequence per step)
core_output_of = functools.partial(tuple.__new__, CoreOutput)


class RequestQueue:
    """The outputs of one request, in order, for the caller that added it. `finished` is set once the
    last one is in the queue."""

    def __init__(self):
        self.outputs: deque[RequestOutput] = deque()
        self.finished = False

    def put(self, out: RequestOutput) -> None:
        self.outputs.append(out)
        self.finished = self.finished or out.finished

    def get(self) -> RequestOutput | None:
        return self.outputs.popleft() if self.outputs else None


@dataclass(slots=True)
class _Output:
    """One of a request's n outputs, as its caller sees it."""

    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    sent_ids: int = 0  # token ids handed out already ("delta")


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: str
    outputs: list[_Output]
    queue: RequestQueue | None
    stream: bool = False  # "delta" with one output and no beam search: process takes _stream_step

    @property
    def finished(self) -> bool:
        if len(self.outputs) == 1:
            return self.outputs[0].finish_reason is not None
        return all(o.finish_reason is not None for o in self.outputs)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            queue: RequestQueue | None) -> None:
        n = 1 if params.use_beam_search else params.n
        outs = [_Output(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop_strings,
                                               params.skip_special_tokens),
                        logprobs=[] if params.logprobs is not None else None,
                        cumulative_logprob=0.0 if params.logprobs is not None else None) for _ in range(n)]
        self.states[request_id] = _RequestState(request_id, prompt, prompt_token_ids, params.output_kind, outs, queue,
                                                stream=params.output_kind == "delta" and n == 1
                                                and not params.use_beam_search)

    def process(self, core_outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[tuple[str, int]],
                                                               list[tuple[str, Exception]]]:
        """-> (the outputs for step()'s caller, the (request id, index) a stop string finished now, the
        (request id, exception) of requests whose outputs failed to process: the engine fails them).
        A request with one output is delivered as its record is read; one with several (n > 1, beam
        search) once all of this step's records are in, so each caller gets one output per step."""
        returned: list[RequestOutput] = []
        stopped, failed = [], []
        several: dict[str, _RequestState] = {}
        states, take = self.states, self._take
        for co in core_outputs:
            state = states.get(co.request_id)
            if state is None:  # failed earlier in this step
                continue
            try:
                if state.stream:
                    if self._stream_step(state, co, returned):
                        stopped.append((co.request_id, 0))
                    continue
                if co.hypotheses is not None:
                    self._take_hypotheses(state, co.hypotheses)
                elif take(state.outputs[co.index], co):
                    stopped.append((co.request_id, co.index))
                if len(state.outputs) > 1:
                    several[co.request_id] = state
                else:
                    self._deliver_one(state, returned)
            except Exception as exc:  # one request's text failed: it alone ends (LLMEngine.fail_request)
                failed.append((co.request_id, exc))
                several.pop(co.request_id, None)
        for state in several.values():
            try:
                finished = state.finished
                if finished or state.kind != "final":
                    self._deliver(state, finished, returned)
            except Exception as exc:
                failed.append((state.request_id, exc))
        return returned, stopped, failed

    def _stream_step(self, state: _RequestState, co: CoreOutput, returned: list[RequestOutput]) -> bool:
        """The common case, kept short: a "delta" request of one output takes its new tokens and gets
        its output at once (holding every token it was sent, it is sent exactly this step's new ones).
        True if a stop string finishes it now."""
        o = state.outputs[0]
        stop_now = self._take(o, co)
        finished = o.finish_reason is not None
        delta = o.detok.delta(finished)
        o.sent_ids = len(o.token_ids)
        out = RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [CompletionOutput(
            0, delta, co.new_token_ids, None if o.logprobs is None else co.new_logprobs or [], o.finish_reason,
            delta, o.cumulative_logprob)], finished)
        if finished:
            del self.states[state.request_id]
        if state.queue is not None:
            state.queue.put(out)
        else:
            returned.append(out)
        return stop_now

    def _deliver_one(self, state: _RequestState, returned: list[RequestOutput]) -> None:
        """A "cumulative" or "final" request of one output ("delta": _stream_step)."""
        finished = state.outputs[0].finish_reason is not None
        if finished or state.kind != "final":
            self._deliver(state, finished, returned)

    def _deliver(self, state: _RequestState, finished: bool, returned: list[RequestOutput]) -> None:
        self._send(state, self._build(state, finished), returned)

    def _send(self, state: _RequestState, out: RequestOutput, returned: list[RequestOutput]) -> None:
        """To the request's queue, else to step()'s caller; a finished request is forgotten."""
        if out.finished:
            del self.states[state.request_id]
        if state.queue is not None:
            state.queue.put(out)
        else:
            returned.append(out)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """End a request: its outputs not finished yet get `reason`, and its queue, if it has one, a last
        output. A request without a queue gets that output returned only when it failed (error set): an
        abort came from whoever drives step(), who knows, as in vLLM (`LLMEngine.is_finished` tells)."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        for o in state.outputs:
            o.finish_reason = o.finish_reason or reason
        try:
            out = self._build(state, final=True)
        except Exception:  # the text itself is what failed: the last output carries none
            out = RequestOutput(request_id, state.prompt, state.prompt_token_ids, [
                CompletionOutput(i, "", list(o.token_ids), None, o.finish_reason) for i, o in enumerate(state.outputs)],
                True)
        out.error = error
        if state.queue is not None:
            state.queue.put(out)
            return None
        return out if error is not None else None

    def has(self, request_id: str) -> bool:
        return request_id in self.states

    # --- internals ------------------------------------------------------------------------------
    @staticmethod
    def _take(o: _Output, co: CoreOutput) -> bool:
        """Add one sequence's new tokens; True if a stop string finishes it now."""
        o.token_ids += co.new_token_ids
        if co.new_logprobs is not None and o.logprobs is not None:
            o.logprobs += co.new_logprobs
            o.cumulative_logprob = co.cumulative_logprob
        detok = o.detok
        if not co.hidden:
            for token in co.new_token_ids:
                detok.add(token)
        if detok.stopped:  # a stop string wins over "length" in the same token, as before
            o.finish_reason = "stop"
            return co.finish_reason is None  # the core has not finished it: the engine does, now
        o.finish_reason = co.finish_reason
        return False

    def _take_hypotheses(self, state: _RequestState, hypotheses) -> None:
        state.outputs = [_Output(detok, ids, logprobs, cum, reason)
                         for ids, logprobs, cum, reason, detok in hypotheses]

    def _build(self, state: _RequestState, final: bool) -> RequestOutput:
        outs = []
        delta_kind = state.kind == "delta"
        for i, o in enumerate(state.outputs):
            delta = o.detok.delta(o.finish_reason is not None)
            if delta_kind:
                sent = o.sent_ids
                o.sent_ids = len(o.token_ids)
                ids = o.token_ids[sent:]
                logprobs = o.logprobs[sent:] if o.logprobs is not None else None
                outs.append(CompletionOutput(i, delta, ids, logprobs, o.finish_reason, delta, o.cumulative_logprob))
            else:
                outs.append(CompletionOutput(i, o.detok.text, list(o.token_ids),
                                             list(o.logprobs) if o.logprobs is not None else None,
                                             o.finish_reason, delta, o.cumulative_logprob))
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs, final)
