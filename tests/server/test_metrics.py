"""/metrics in vLLM's names under the cupaged: prefix, labelled model_name, checked against what the
responses themselves report: token counters move by the usage the requests returned, one TTFT,
end-to-end and queue-time observation per request, one inter-token gap per token after the first,
finished choices counted by their finish_reason, and the KV pool back to 0% used when idle."""
from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import API_KEY, MODEL, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
VLLM_NAMES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
              "prefix_cache_hits", "prompt_tokens", "generation_tokens", "request_success", "num_preemptions",
              "client_disconnects", "time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds"]


def scrape(http) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    key = (f"cupaged:{name}", tuple(sorted({"model_name": MODEL, **labels}.items())))
    return samples.get(key, 0.0)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base_url, headers=AUTH, timeout=60) as client:
        yield client


def test_every_vllm_metric_is_there_with_the_model_label(http):
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    for name in VLLM_NAMES:
        assert f"cupaged:{name}" in families, name
        assert all(s.labels.get("model_name") == MODEL for s in families[f"cupaged:{name}"].samples), name


def run(http, body: dict) -> tuple[dict, list[str]]:
    """(usage, finish reasons) of one completion request, streamed (with a usage chunk) or not."""
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200
    if not body.get("stream"):
        return reply.json()["usage"], [c["finish_reason"] for c in reply.json()["choices"]]
    chunks = [json.loads(ln[6:]) for ln in reply.text.splitlines() if ln.startswith("data: {")]
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    return chunks[-1]["usage"], reasons


def test_counters_and_histograms_follow_the_requests(http, served):
    wait_idle(served.llm)
    before = scrape(http)
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": k, "temperature": 0, "ignore_eos": True, "stream": s}
              for p, k, s in (("One two", 5, False), ("The sky is", 7, True), ("Hello", 3, False))]
    bodies.append({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": [" 6"],
                   "stream": True})
    for body in bodies:
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
    results = [run(http, body) for body in bodies]
    wait_idle(served.llm)
    after = scrape(http)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    generated = sum(usage["completion_tokens"] for usage, _ in results)
    reasons = [r for _, rs in results for r in rs]
    assert moved("generation_tokens_total") == generated
    assert moved("prompt_tokens_total") == sum(usage["prompt_tokens"] for usage, _ in results)
    assert moved("request_success_total", finished_reason="length") == reasons.count("length") == 3
    assert moved("request_success_total", finished_reason="stop") == reasons.count("stop") == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert moved(f"{name}_count") == len(bodies), name
    assert moved("inter_token_latency_seconds_count") == generated - len(bodies)
    assert moved("e2e_request_latency_seconds_sum") >= moved("time_to_first_token_seconds_sum") > 0
    assert value(after, "kv_cache_usage_perc") == 0 and value(after, "num_requests_running") == 0
