"""`cupaged serve` as a user starts it: a subprocess on a free port answers /health and a chat, and
SIGTERM during a stream lets it finish within the grace period, then exits 0."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.api.test_generate import BLOCK_BYTES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_shuts_down_gracefully_on_sigterm(smollm2_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "cupaged.cli.main", "serve", "-m", str(smollm2_dir), "--backend", "cpu",
           "--port", str(port), "--max-model-len", "512", "--kv-cache-memory", str(64 * BLOCK_BYTES),
           "--shutdown-grace", "20", "--served-model-name", "smol"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError("the server never came up")
        body = {"model": "smol", "prompt": "Count:", "max_tokens": 24, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # mid-stream: the running request gets to finish
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in "".join(rest)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode(errors="replace")
    assert "serving smol on http://127.0.0.1" in out, out
