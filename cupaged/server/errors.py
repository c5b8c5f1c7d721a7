"""The server's errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: APIError for
the endpoints to raise, the handlers that turn the engine's, FastAPI's and Starlette's errors into that
shape with the right status (naming the parameter where one is at fault), and Guard, the middleware
for the API key and the body size limit."""
from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cupaged.async_llm import EngineClosedError
from cupaged.errors import InvalidRequestError
from cupaged.server.protocol import ChatRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body. code is a string as in OpenAI's API ("invalid_api_key", "model_not_found",
    "context_length_exceeded") or null; the HTTP status carries the number."""
    if code is None and "context length" in message:
        code = "context_length_exceeded"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


FIELDS = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields)


def param_of(message: str) -> str | None:
    """The request field an InvalidRequestError is about ("top_p must be ..." -> "top_p"; the prompt's
    own problems -> "prompt"), or None."""
    word = message.split(" ", 1)[0]
    if word in FIELDS:
        return word
    if message.startswith(("the prompt", "prompt")):
        return "prompt"
    return None


class Guard:
    """ASGI middleware: the API key (constant-time, every path but /health) and the body size limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.api_key.encode()):
                body = error_body("invalid or missing API key (send Authorization: Bearer <key>)",
                                  "authentication_error", code="invalid_api_key")
                return await JSONResponse(body, 401)(scope, receive, send)
        length = headers.get(b"content-length")
        if scope["method"] == "POST" and (length is None or not length.isdigit()):
            body = error_body("a POST needs a Content-Length header (bodies are size-limited)",
                              "invalid_request_error", code="length_required")
            return await JSONResponse(body, 411)(scope, receive, send)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            body = error_body(f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes}",
                              "invalid_request_error", code="request_too_large")
            return await JSONResponse(body, 413)(scope, receive, send)
        return await self.app(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), e.status)

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, e: InvalidRequestError):
        return JSONResponse(error_body(str(e), "invalid_request_error", param_of(str(e))), 400)

    @app.exception_handler(EngineClosedError)
    async def closed(request: Request, e: EngineClosedError):
        return JSONResponse(error_body(str(e), "unavailable_error"), 503)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
        elif param:
            message = f"{param}: {message} (got {first.get('input')!r:.80})"
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"no such path: {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(message, kind), e.status_code)
