"""Every Numba kernel of the CPU backend releases the GIL while it runs (compiled nogil=True), so an
event loop in another thread (AsyncLLM's callers, a server's /health) keeps running during a step;
checked on the dispatchers' options and by a thread that counts while a serial kernel computes."""
from __future__ import annotations

import threading
import time

import numba
import numpy as np

from cupaged.backend import cpu_gemm, cpu_kernels, cpu_math


def dispatchers():
    for module in (cpu_kernels, cpu_gemm, cpu_math):
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj


def test_every_kernel_is_compiled_nogil():
    found = dict(dispatchers())
    assert {"cupaged.backend.cpu_gemm.matmul_nt", "cupaged.backend.cpu_kernels.paged_attention"} <= set(found)
    assert [name for name, d in found.items() if not d.targetoptions.get("nogil")] == []


def test_another_thread_runs_while_a_serial_kernel_computes():
    # A parallel kernel's launcher lets the GIL go while its workers run even without nogil; a serial
    # one (rms_norm) holds it for the whole call unless compiled nogil=True.
    x = np.random.default_rng(0).standard_normal((32768, 576), dtype=np.float32)
    weight = np.random.default_rng(1).standard_normal(576, dtype=np.float32)
    out = np.empty_like(x)
    cpu_kernels.rms_norm(x[:4], weight, np.float32(1e-5), out[:4])  # compiled (or loaded) first
    ticks, stop, started = [0], threading.Event(), threading.Event()

    def count():
        started.set()
        while not stop.is_set():
            ticks[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    started.wait()
    t0, before = time.perf_counter(), ticks[0]
    time.sleep(0.05)  # the counter's rate with the GIL free
    rate = (ticks[0] - before) / (time.perf_counter() - t0)
    t0, before = time.perf_counter(), ticks[0]
    cpu_kernels.rms_norm(x, weight, np.float32(1e-5), out)  # one call, ~19M elements
    during, elapsed = ticks[0] - before, time.perf_counter() - t0
    stop.set()
    thread.join()
    # holding the GIL, the counter would get one switch interval (5 ms) of the call at most
    assert during > 0.3 * rate * elapsed, (during, rate * elapsed)
    ref = x[:8] / np.sqrt((x[:8].astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(out[:8], ref, rtol=1e-4, atol=1e-5)
