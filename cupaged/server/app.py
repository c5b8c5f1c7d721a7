"""The OpenAI-compatible HTTP API on AsyncLLM (FastAPI).

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
"stream": true, ending with `data: [DONE]`), GET /v1/models, /health, /version, /metrics (Prometheus
text), POST /tokenize and /detokenize. Errors have OpenAI's shape, {"error": {"message", "type",
"param", "code"}}: 400 for a bad parameter (named), a malformed body or a prompt over the context;
401 without the API key; 404 for an unknown model or path; 411 for a POST without Content-Length and
413 for a body over the limit; 503 while
the waiting queue is full or the engine is shutting down.

Each HTTP request's prompts become engine requests whose outputs stream back through AsyncLLM; bad
input is refused before the response starts, and a client that disconnects mid-stream aborts its
requests (the stream's generators are closed). /health answers without the API key.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from cupaged import __version__
from cupaged.async_llm import AsyncLLM
from cupaged.errors import CupagedError, InvalidRequestError
from cupaged.outputs import RequestOutput
from cupaged.server import openai_format as fmt
from cupaged.server.errors import APIError, Guard, param_of, add_error_handlers
from cupaged.server.metrics import Metrics, log_status
from cupaged.server.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

logger = logging.getLogger(__name__)


class Server:
    """What the endpoints share. llm may come later (`attach`): until then every endpoint but /health
    and /version answers 503, and /health says "loading" (or why loading failed)."""

    def __init__(self, llm: AsyncLLM | None, model_name: str, max_waiting_requests: int = 1024):
        self.model_name, self.max_waiting = model_name, max_waiting_requests
        self.llm: AsyncLLM | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(model_name)
        self.unstarted = 0  # engine requests added by this server that have not had their first output
        if llm is not None:
            self.attach(llm)

    def attach(self, llm: AsyncLLM) -> None:
        self.tokenizer = llm.tokenizer
        self.logprobs = fmt.Logprobs(self.tokenizer)
        self.metrics.attach(llm)
        self.llm = llm  # last: the endpoints take this as "ready"

    # --- checks -----------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.llm is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, message, "unavailable_error")

    def check_model(self, model: str | None) -> None:
        self.check_ready()
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def check_room(self, count: int) -> None:
        """Refuse (503) what would put more than max_waiting requests in line for their first output."""
        if self.unstarted + count > self.max_waiting:
            raise APIError(503, f"the server is overloaded: {self.unstarted} requests are waiting for their "
                                f"first token (--max-waiting-requests {self.max_waiting}); retry later",
                           "overloaded_error")

    # --- running prompts --------------------------------------------------------------------------
    async def start(self, prompts: list, params, base_id: str) -> list[tuple[RequestOutput, AsyncIterator]]:
        """Add every prompt; each stream's first output is taken, so bad input raises here, before any
        response starts (and the prompts already added are aborted)."""
        self.check_room(len(prompts))
        self.unstarted += len(prompts)  # counted on the event loop: no other thread changes it
        gens = [self.llm.generate(prompt, params, f"{base_id}-{i}") for i, prompt in enumerate(prompts)]
        try:  # all added at once, so a list of prompts is batched
            firsts = await asyncio.gather(*(gen.__anext__() for gen in gens), return_exceptions=True)
        finally:
            self.unstarted -= len(prompts)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            for gen in gens:
                await gen.aclose()
            raise errors[0]
        started = list(zip(firsts, gens))
        return started

    @staticmethod
    async def merged(started) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every stream as they come; leaving early closes them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, first: RequestOutput, gen) -> None:
            try:
                await queue.put((i, first))
                if not first.finished:
                    async for out in gen:
                        await queue.put((i, out))
            finally:
                await gen.aclose()
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, first, gen)) for i, (first, gen) in enumerate(started)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()

    # --- endpoints --------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest):
        self.check_model(body.model)
        params = self._params(body)
        prompts = self._prompts(body.prompt)
        rid, created = fmt.new_id("cmpl"), fmt.now()
        started = await self.start(prompts, params, rid)
        prompt_tokens = sum(len(first.prompt_token_ids) for first, _ in started)
        top = body.logprobs or 0
        offsets: dict[int, int] = {}

        def choices(i: int, out: RequestOutput) -> list[dict]:
            result = []
            for o in out.outputs:
                index = i * params.n + o.index
                logprobs = self.logprobs.completion(o, offsets.get(index, 0), top)
                offsets[index] = offsets.get(index, 0) + len(o.text)
                result.append(fmt.completion_choice(index, o, logprobs))
            return result

        if body.stream:
            return self._sse(started, "text_completion", rid, created, prompt_tokens, body, choices)
        return await self._whole(started, "text_completion", rid, created, prompt_tokens, params.n, choices)

    async def chat(self, body: ChatRequest):
        self.check_model(body.model)
        params = self._params(body)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
        rid, created = fmt.new_id("chatcmpl"), fmt.now()
        started = await self.start([prompt], params, rid)
        top, stream = body.top_logprobs or 0, body.stream

        def choices(i: int, out: RequestOutput) -> list[dict]:
            return [fmt.chat_choice(o.index, o, self.logprobs.chat(o, top), delta=stream, first=False)
                    for o in out.outputs]

        if stream:
            head = [fmt.chat_choice(j, _Empty(), None, delta=True, first=True) for j in range(params.n)]
            return self._sse(started, "chat.completion.chunk", rid, created, len(prompt["prompt_token_ids"]), body,
                             choices, head)
        return await self._whole(started, "chat.completion", rid, created, len(prompt["prompt_token_ids"]),
                                 params.n, choices)

    def _sse(self, started, kind, rid, created, prompt_tokens, body, choices, head=None) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            generated = 0
            if head:
                yield _event(fmt.envelope(kind, rid, self.model_name, created, head))
            async for i, out in self.merged(started):
                generated += sum(len(o.token_ids) for o in out.outputs)
                moved = [c for c, o in zip(choices(i, out), out.outputs) if o.text or o.token_ids or o.finish_reason]
                if moved:
                    yield _event(fmt.envelope(kind, rid, self.model_name, created, moved))
            if include_usage:
                yield _event(fmt.envelope(kind, rid, self.model_name, created, [],
                                          fmt.usage(prompt_tokens, generated)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _whole(self, started, kind, rid, created, prompt_tokens, n, choices) -> dict:
        merged: dict[int, dict] = {}
        generated = 0
        async for i, out in self.merged(started):
            generated += sum(len(o.token_ids) for o in out.outputs)
            for choice in choices(i, out):
                _accumulate(merged, choice)
        ordered = [merged[k] for k in sorted(merged)]
        return fmt.envelope(kind, rid, self.model_name, created, ordered, fmt.usage(prompt_tokens, generated))

    def _params(self, body):
        try:
            return fmt.sampling_params(body)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=param_of(str(e))) from e

    @staticmethod
    def _prompts(prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [{"prompt_token_ids": prompt}]
        return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


class _Empty:
    """A choice with nothing yet: the role-only first chunk of a chat stream."""
    text, token_ids, logprobs, finish_reason, index = "", [], None, None, 0


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _accumulate(merged: dict[int, dict], choice: dict) -> None:
    """Fold one delta choice into the whole choice of its index."""
    index = choice["index"]
    if index not in merged:
        merged[index] = choice
        return
    whole = merged[index]
    whole["finish_reason"] = choice["finish_reason"] or whole["finish_reason"]
    if "message" in whole:
        whole["message"]["content"] += choice["message"]["content"]
        if choice["logprobs"]:
            whole["logprobs"]["content"] += choice["logprobs"]["content"]
    else:
        whole["text"] += choice["text"]
        if choice["logprobs"]:
            for key in whole["logprobs"]:
                whole["logprobs"][key] += choice["logprobs"][key]


def build_app(server: Server, api_key: str | None = None, max_body_bytes: int = 1 << 22,
              allowed_origins: list[str] | None = None, shutdown_grace_s: float = 10.0,
              loader: Callable[[], AsyncLLM] | None = None,
              on_load_error: Callable[[Exception], None] | None = None, status_every_s: float = 0) -> FastAPI:
    """loader: makes the AsyncLLM in a thread once the server is up (so /health answers "loading"
    meanwhile); on_load_error is called with what it raised. status_every_s: log a status line that
    often while busy (0: never)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if loader is not None and server.llm is None:
            threading.Thread(target=_load, args=(server, loader, on_load_error), daemon=True).start()
        status = asyncio.create_task(log_status(server.metrics, status_every_s)) if status_every_s else None
        yield
        if status is not None:
            status.cancel()
        if server.llm is not None:
            await server.llm.shutdown(shutdown_grace_s)

    app = FastAPI(title="cupaged", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    if allowed_origins:  # added last, so outermost: a browser's preflight (no key) is answered before Guard
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        if server.llm is None:
            status = {"status": "failed", "error": server.load_error} if server.load_error else {"status": "loading"}
            return JSONResponse(status, 503)
        ok = server.llm.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        server.check_ready()
        llm = server.llm
        card = {"id": server.model_name, "object": "model", "created": fmt.now(), "owned_by": "cupaged",
                "max_model_len": llm.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type=server.metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = server.tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages])
            ids = server.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.llm.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        vocab = server.llm.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is not in [0, {vocab})", param="tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}

    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    return app


def _load(server: Server, loader, on_load_error) -> None:
    try:
        server.attach(loader())
    except Exception as e:  # noqa: BLE001 (reported on /health and to the caller)
        server.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, CupagedError) else str(e)
        logger.error("loading the model failed: %s", server.load_error)
        if on_load_error is not None:
            on_load_error(e)
