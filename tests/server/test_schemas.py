"""Every body the server sends, read as raw JSON and checked against the `openai` package's own types:
it validates, and it carries no key those types do not know (their models allow extras, so the
client alone would not notice a misspelt or invented field). Chat and completions, whole and
streamed, with logprobs and usage chunks; /v1/models; the error body. Plus CORS: no headers unless
--allowed-origins names the origin."""
from __future__ import annotations

import json

import httpx
import pytest
from openai.types import Completion, ErrorObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from tests.server.conftest import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Name a colour."}]
# vLLM's extensions, which its clients read and the openai types do not list: a choice's stop_reason
# (the stop string or token id that ended it) and a model's max_model_len
EXTENSIONS = {"stop_reason", "max_model_len"}


def unknown_keys(obj, path: str = "") -> list[str]:
    """Dotted paths of the keys no pydantic model in obj declares (recursing through lists and dicts)."""
    if isinstance(obj, BaseModel):
        extra = [f"{path}.{k}" for k in (obj.model_extra or {}) if k not in EXTENSIONS]
        return extra + [p for name in type(obj).model_fields
                        for p in unknown_keys(getattr(obj, name), f"{path}.{name}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, x in enumerate(obj) for p in unknown_keys(x, f"{path}[{i}]")]
    if isinstance(obj, dict):
        return [p for k, x in obj.items() for p in unknown_keys(x, f"{path}.{k}")]
    return []


def conforms(model: type[BaseModel], body: dict) -> BaseModel:
    parsed = model.model_validate(body)
    assert unknown_keys(parsed) == [], (model.__name__, body)
    return parsed


def events(reply: httpx.Response) -> list[dict]:
    lines = [ln[6:] for ln in reply.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=60) as client:
        yield client


def test_chat_bodies_match_the_openai_types(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    whole = conforms(ChatCompletion, http.post("/v1/chat/completions", json=body).json())
    assert whole.object == "chat.completion" and whole.choices[0].logprobs.content
    stream = events(http.post("/v1/chat/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}))
    chunks = [conforms(ChatCompletionChunk, e) for e in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_bodies_match_the_openai_types(http):
    body = {"model": MODEL, "prompt": ["Red,", "One,"], "max_tokens": 3, "temperature": 0, "logprobs": 2}
    whole = conforms(Completion, http.post("/v1/completions", json=body).json())
    assert whole.object == "text_completion" and len(whole.choices) == 2 and whole.choices[0].logprobs.tokens
    stream = events(http.post("/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}))
    # OpenAI streams completions as Completion objects whose finish_reason is null until a choice ends;
    # the type (shared with the whole response) says non-null, and the client builds chunks unvalidated
    last = {c["index"]: i for i, e in enumerate(stream) for c in e["choices"]}
    for i, e in enumerate(stream):
        for c in e["choices"]:
            assert (c["finish_reason"] is None) == (i != last[c["index"]])
            c["finish_reason"] = c["finish_reason"] or "length"
    chunks = [conforms(Completion, e) for e in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models_and_errors_match_the_openai_types(http):
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list" and [conforms(Model, m).id for m in listing["data"]] == [MODEL]
    cases = [({"model": MODEL, "prompt": "x", "max_tokens": 0}, {}, 400, "max_tokens", None),
             ({"model": MODEL, "prompt": "word " * 1100}, {}, 400, "prompt", "context_length_exceeded"),
             ({"model": "gpt-4", "prompt": "x"}, {}, 404, "model", "model_not_found"),
             ({"model": MODEL, "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, None, "invalid_api_key")]
    for body, headers, status, param, code in cases:
        reply = http.post("/v1/completions", json=body, headers=headers)
        assert reply.status_code == status and set(reply.json()) == {"error"}
        error = conforms(ErrorObject, reply.json()["error"])
        assert (error.param, error.code) == (param, code)


def test_no_cors_headers_unless_asked(http):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    reply = http.options("/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in reply.headers
    assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "https://app.example"}).headers


def test_allowed_origins_are_answered_and_others_are_not():
    from fastapi.testclient import TestClient

    from cupaged.server.app import Server, build_app
    app = build_app(Server(None, MODEL), api_key=API_KEY, allowed_origins=["https://app.example"])
    with TestClient(app) as client:
        # a browser's preflight carries no key: it is answered before the key check
        ok = client.options("/v1/completions", headers={"Origin": "https://app.example",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/v1/completions", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        plain = client.get("/version", headers={"Origin": "https://app.example", **AUTH})
        assert plain.status_code == 200 and plain.headers["access-control-allow-origin"] == "https://app.example"
        unkeyed = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert unkeyed.status_code == 401
