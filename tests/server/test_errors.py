"""Bad input over HTTP gets OpenAI's error shape with the right status and the problem named, and a
normal request right after still succeeds; the API key guards every endpoint but /health; a client
that disconnects mid-stream has its request aborted (counted) and its blocks freed."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=60) as client:
        yield client


def still_serves(http) -> None:
    reply = http.post("/v1/completions", json=COMPLETION)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be at least 1"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "Field required"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "'system', 'user', 'assistant' or 'tool'"),
    ("/v1/chat/completions", {**CHAT, "n": 9}, 400, "n", "max_num_seqs"),
    ("/v1/completions", {**COMPLETION, "prompt": "word " * 1100}, 400, "prompt", "context length is 1024"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 10**9]}, 400, "prompt", "not a token id"),
    ("/v1/completions", {**COMPLETION, "logprobs": 99}, 400, "logprobs", "logprobs must be in [0, 20]"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", "boolean"),
])
def test_bad_request_gets_its_status_and_names_the_problem(http, served, path, body, status, param, words):
    reply = http.post(path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert error["param"] == param
    still_serves(http)
    wait_idle(served.llm)


def test_malformed_json_is_a_400(http):
    reply = http.post("/v1/chat/completions", content=b'{"model": "smol", "messages": [', headers={
        "Content-Type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    still_serves(http)


def test_api_key_guards_everything_but_health(served):
    with httpx.Client(base_url=served.base_url, timeout=30) as bare:
        assert bare.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
                reply = bare.request(method, path, headers=headers, json=COMPLETION if method == "POST" else None)
                assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"


def test_unknown_path_and_oversized_body(http):
    reply = http.get("/v1/nothing")
    assert reply.status_code == 404 and "no such path" in reply.json()["error"]["message"]
    reply = http.post("/v1/completions", json={**COMPLETION, "prompt": "x" * (1 << 17)})
    assert reply.status_code == 413 and "over the limit" in reply.json()["error"]["message"]
    still_serves(http)


def test_tokenize_detokenize_version_metrics(http, smol_llm):
    ids = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert ids["tokens"] == smol_llm.tokenizer.encode("Hello world", add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    assert http.get("/version").json()["version"]
    text = http.get("/metrics").text
    assert "cupaged:kv_cache_usage_perc" in text and "cupaged:generation_tokens_total" in text


def test_clients_that_disconnect_are_aborted(http, served):
    before = served.llm.stats.aborted_by_caller
    body = {**COMPLETION, "max_tokens": 200, "stream": True, "extra": 1}
    for _ in range(12):
        with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            next(reply.iter_lines())  # the first chunk, then the client goes away
    wait_idle(served.llm)
    assert served.llm.stats.aborted_by_caller - before == 12
    still_serves(http)
