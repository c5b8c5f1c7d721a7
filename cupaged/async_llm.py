"""AsyncLLM: the engine's step loop in a background thread, each request's outputs in its own asyncio
queue. The engine core for a server (issue: `cupaged serve`).

Threads: one engine thread owns the `LLMEngine` and is the only one that calls it (the contract in
docs/architecture.md, "Outputs and threads"). Callers, on an asyncio event loop, hand it work through
a command queue: `generate` sends an add (its errors, e.g. InvalidRequestError, come back to the
caller) and `abort` an abort; the engine thread runs them between steps and steps while anything is
unfinished, else sleeps on the command queue. Each output the engine delivers to a request's queue is
moved onto the caller's loop with `call_soon_threadsafe`, so no caller ever touches engine state.

Why a thread and not a process (vLLM V1 runs its EngineCore in a process over ZeroMQ): on the CPU
backend every heavy op is a Numba kernel (parallel ones release the GIL through Numba's launcher, the
serial ones are compiled `nogil=True`) or a NumPy call, all of which let the GIL go while they run, so
the event loop keeps answering while a long prefill step computes, without copying every output
across a process boundary. `benchmarks/async_health.py` measures how long a
coroutine on the loop waits while 2,048-token prefill steps run (docs/results.md).

A request whose caller goes away (the async generator is closed or cancelled before its last output)
is aborted in the engine thread's next turn, which frees its blocks; `stats.aborted_by_caller` counts
them. `shutdown(grace_s)` stops new requests, lets the running ones finish for up to grace_s, aborts
the rest and stops the thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from cupaged.engine.output_processor import RequestQueue
from cupaged.errors import CupagedError
from cupaged.llm import make_engine
from cupaged.outputs import RequestOutput
from cupaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineClosedError(CupagedError):
    """The engine is shutting down (or its thread has died) and takes no new request."""


@dataclass
class AsyncStats:
    """Counters since start-up (read from any thread; written by the engine thread)."""

    added: int = 0
    aborted_by_caller: int = 0   # the caller went away before the last output
    aborted_at_shutdown: int = 0
    steps: int = 0
    step_failures: int = 0       # steps that raised (their requests were failed, the loop went on)


class RequestObserver(Protocol):
    """Told about every request as its caller sees it (a stats logger: the server's Prometheus metrics).
    on_tokens and on_finished run on the caller's event loop, on_scheduled in the engine thread."""

    def on_tokens(self, new_tokens: int, seconds: float, first: bool) -> None:
        """An output brought new_tokens; seconds since the request was sent (first) or since its last
        output with tokens (time to first token / inter-token latency)."""

    def on_finished(self, out: RequestOutput, seconds: float) -> None:
        """The request's last output, seconds after it was sent (end-to-end latency)."""

    def on_scheduled(self, seconds: float) -> None:
        """A sequence ran its first step after waiting seconds in the queue."""


@dataclass
class _Progress:
    """One request's timing, as its caller sees it."""
    sent: float                  # time.monotonic() when generate was called
    last: float | None = None    # when the last output with new tokens came
    tokens: int = 0              # tokens seen so far (for cumulative outputs)


class _LoopQueue(RequestQueue):
    """A request's outputs, handed from the engine thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self.loop = loop
        self.items: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def put(self, out: RequestOutput) -> None:  # engine thread
        self.finished = self.finished or out.finished
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nobody is left to read it
            pass


class AsyncLLM:
    def __init__(self, model: str | None = None, backend="auto", **kwargs):
        """The same arguments as `LLM` (EngineConfig's fields). Loads the model, then starts the engine
        thread; `ready` is set once it runs."""
        self.engine = make_engine(model, backend, **kwargs)
        self.tokenizer = self.engine.tokenizer
        self.stats = AsyncStats()
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.observer: RequestObserver | None = None
        self.engine.scheduler.queue_times = []  # drained after each step (to the observer, if any)
        self._accepting = True
        self._stop = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="cupaged-engine", daemon=True)
        self._thread.start()

    # --- callers (any thread; generate on an event loop) -------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as the engine makes them (as params.output_kind says), ending
        with its finished one. Bad input raises here, before the first output. Closing or cancelling
        the generator early aborts the request."""
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down and takes no new request")
        rid = f"async-{next(self._ids)}" if request_id is None else str(request_id)
        q = _LoopQueue(asyncio.get_running_loop())
        progress = _Progress(time.monotonic())
        try:
            await asyncio.wrap_future(self._call(lambda: self._add(rid, prompt, params, q)))
        except asyncio.CancelledError:  # gone before the add ran: the abort queues behind it
            self._call(lambda: self._abort_by_caller(rid))
            raise
        try:
            while True:
                out = await q.items.get()
                if self.observer is not None:
                    self._observe(out, params, progress)
                yield out
                if out.finished:
                    return
        finally:
            if not q.finished:
                self._call(lambda: self._abort_by_caller(rid))

    def _observe(self, out: RequestOutput, params: SamplingParams | None, progress: _Progress) -> None:
        now, count = time.monotonic(), sum(len(o.token_ids) for o in out.outputs)
        new = count if params is not None and params.output_kind == "delta" else count - progress.tokens
        if new > 0:
            self.observer.on_tokens(new, now - (progress.last or progress.sent), progress.last is None)
            progress.tokens, progress.last = progress.tokens + new, now
        if out.finished:
            self.observer.on_finished(out, now - progress.sent)

    def warm_up(self) -> None:
        """Before serving (no request added yet): run one tiny request in the engine thread, so the
        backend's kernels compile or load now rather than in the first request (engine/warm_up.py).
        Blocks until it is done."""
        from cupaged.engine.warm_up import warm_up
        self._call(lambda: warm_up(self.engine)).result()

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (its stream ends with finish_reason "abort")."""
        self._call(lambda: self.engine.abort(request_id))

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop taking requests; let the running ones finish for up to grace_s; abort the rest; stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.engine.has_unfinished_requests() and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.wrap_future(self._call(self._abort_all))
        self._stop = True
        self._commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def num_unfinished(self) -> int:
        return len(self.engine.requests)

    # --- the engine thread -------------------------------------------------------------------------
    def _call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn in the engine thread between steps; its result or exception lands in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                future.set_exception(exc)

        if not self._thread.is_alive():
            future.set_exception(EngineClosedError("the engine thread has stopped"))
            return future
        self._commands.put(command)
        return future

    def _run(self) -> None:
        engine = self.engine
        while not self._stop:
            self._drain(block=not engine.has_unfinished_requests())
            if self._stop or not engine.has_unfinished_requests():
                continue
            try:
                engine.step()
                self.stats.steps += 1
                self._report_queue_times()
            except Exception as exc:  # not one request's failure: fail all, keep the loop alive
                self.stats.step_failures += 1
                logger.exception("engine step failed; failing its %d requests", len(engine.requests))
                for rid in list(engine.requests):
                    engine.fail_request(rid, exc)

    def _report_queue_times(self) -> None:
        times = self.engine.scheduler.queue_times
        if times:
            if self.observer is not None:
                for seconds in times:
                    self.observer.on_scheduled(seconds)
            times.clear()

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, rid: str, prompt, params: SamplingParams | None, q: _LoopQueue) -> None:
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down and takes no new request")
        self.engine.add_request(rid, prompt, params, queue=q)
        self.stats.added += 1

    def _abort_by_caller(self, rid: str) -> None:
        if not self.engine.is_finished(rid):
            self.engine.abort(rid)
            self.stats.aborted_by_caller += 1

    def _abort_all(self) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self.stats.aborted_at_shutdown += 1
