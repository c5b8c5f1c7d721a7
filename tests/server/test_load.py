"""Many streams at once over loopback: 1,000 concurrent streaming requests with short outputs all
complete with the right token count and leave the KV pool free; 200 clients that leave after their
first chunk are all aborted (counted) and the server keeps serving; an overload past
--max-waiting-requests is refused with 503 instead of queued."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.api.test_generate import BLOCK_BYTES
from tests.server.conftest import wait_idle


@pytest.fixture(scope="module")
def wide(smollm2_dir):
    """A server for many streams: 64 sequences per step, room for 2,000 waiting, no API key."""
    import uvicorn

    from cupaged.async_llm import AsyncLLM
    from cupaged.server.app import Server, build_app

    llm = AsyncLLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=2048 * BLOCK_BYTES, max_model_len=256,
                   max_num_seqs=64, progress=False)
    server = Server(llm, "smol", max_waiting_requests=2000)
    uv = uvicorn.Server(uvicorn.Config(build_app(server, shutdown_grace_s=0), host="127.0.0.1", port=0,
                                       log_level="warning", backlog=4096, limit_concurrency=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}", server
    uv.should_exit = True
    thread.join(timeout=30)


BODY = {"model": "smol", "max_tokens": 3, "stream": True, "ignore_eos": True, "temperature": 0,
        "stream_options": {"include_usage": True}}


async def stream_one(client: httpx.AsyncClient, i: int, leave_early: bool = False) -> int | None:
    """Completion tokens the stream reports in its usage chunk (None if it left early)."""
    async with client.stream("POST", "/v1/completions", json={**BODY, "prompt": f"Request {i}:"}) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if leave_early and line.startswith("data: "):
                return None
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    return chunk["usage"]["completion_tokens"]
    raise AssertionError("the stream ended without its usage chunk")


def run_clients(base: str, count: int, leave_early: bool = False) -> list:
    async def main():
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, i, leave_early) for i in range(count)))
    return asyncio.run(main())


def test_a_thousand_concurrent_streams(wide):
    base, server = wide
    t0 = time.monotonic()
    counts = run_clients(base, 1000)
    assert counts == [3] * 1000
    assert time.monotonic() - t0 < 600  # bounded: a hang fails here rather than at CI's limit
    wait_idle(server.llm)


def test_two_hundred_clients_that_leave_early(wide):
    base, server = wide
    before = server.llm.stats.aborted_by_caller
    body_tokens = BODY["max_tokens"]
    BODY["max_tokens"] = 200
    try:
        run_clients(base, 200, leave_early=True)
    finally:
        BODY["max_tokens"] = body_tokens
    wait_idle(server.llm, timeout=120)
    aborted = server.llm.stats.aborted_by_caller - before
    assert aborted == 200
    metric = httpx.get(base + "/metrics").text
    assert 'cupaged:client_disconnects_total{model_name="smol"} ' + f"{float(server.llm.stats.aborted_by_caller)}" in metric
    assert run_clients(base, 3) == [3, 3, 3]


def test_overload_past_the_waiting_bound_is_a_503(smollm2_dir):
    from cupaged.async_llm import AsyncLLM
    from cupaged.server.app import Server, build_app

    llm = AsyncLLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=64 * BLOCK_BYTES, max_model_len=256,
                   max_num_seqs=1, progress=False)
    server = Server(llm, "smol", max_waiting_requests=2)
    app = build_app(server, shutdown_grace_s=0)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            body = {"model": "smol", "prompt": "Hi", "max_tokens": 30, "ignore_eos": True}
            replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))
        return [r.status_code for r in replies], [r.json() for r in replies]

    statuses, bodies = asyncio.run(main())
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1
    refused = [b for s, b in zip(statuses, bodies) if s == 503]
    assert all("--max-waiting-requests 2" in b["error"]["message"] for b in refused)
    asyncio.run(llm.shutdown(grace_s=0))
