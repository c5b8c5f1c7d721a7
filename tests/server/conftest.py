"""A `cupaged serve` app on SmolLM2 (CPU backend) on a free loopback port, shared by the server tests."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from tests.api.test_generate import BLOCK_BYTES

API_KEY = "test-key-123"
MODEL = "smol"


@dataclass
class Running:
    base_url: str      # http://127.0.0.1:PORT
    server: object     # cupaged.server.app.Server

    @property
    def llm(self):
        return self.server.llm


@pytest.fixture(scope="session")
def served(smollm2_dir):
    import uvicorn

    from cupaged.async_llm import AsyncLLM
    from cupaged.server.app import Server, build_app

    llm = AsyncLLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=512 * BLOCK_BYTES, max_model_len=1024,
                   max_num_seqs=8, progress=False)
    server = Server(llm, MODEL, max_waiting_requests=64)
    app = build_app(server, api_key=API_KEY, max_body_bytes=1 << 16, shutdown_grace_s=1.0)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(500):
        if uv.started:
            break
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield Running(f"http://127.0.0.1:{port}", server)
    uv.should_exit = True
    thread.join(timeout=30)


def wait_idle(llm, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while llm.num_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    bm = llm.engine.block_manager
    assert llm.num_unfinished() == 0 and bm.num_free_blocks == bm.num_blocks
