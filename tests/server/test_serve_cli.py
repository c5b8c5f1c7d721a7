"""`cupaged serve` as a user starts it: a subprocess on a free port answers /health and a chat, and
SIGTERM during a stream lets it finish within the grace period, then exits 0; while busy it logs a
status line."""
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
           "--shutdown-grace", "20", "--served-model-name", "smol", "--status-every", "0.05"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, early = time.monotonic() + 180, set()
        while time.monotonic() < deadline:
            try:
                health = httpx.get(base + "/health", timeout=1)
                if health.status_code == 200:
                    break
                early.add((health.status_code, health.json()["status"]))
                models = httpx.get(base + "/v1/models", timeout=1)
                assert models.status_code in (200, 503), models.text
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the server never came up")
        assert early <= {(503, "loading")}, early  # bound before the model loaded: it says so
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
    assert "INFO cupaged.server.metrics: running 1, waiting 0, generation" in out, out  # the status line


def test_serve_with_a_model_that_fails_to_load_exits_1():
    cmd = [sys.executable, "-m", "cupaged.cli.main", "serve", "-m", "/no/such/model/dir", "--backend", "cpu",
           "--port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Error:" in done.stderr and "/no/such/model/dir" in done.stderr, done.stderr


def test_serve_refuses_bad_options_before_binding():
    done = subprocess.run([sys.executable, "-m", "cupaged.cli.main", "serve", "--kv-cache-memory", "1",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "kv_cache_fraction must be in (0, 0.9]" in done.stderr
