"""Every Numba kernel of the CPU backend releases the GIL while it runs (compiled nogil=True), so an
event loop in another thread (AsyncLLM's callers, a server's /health) keeps running during a step;
checked on the dispatchers' options and by a thread that counts while a kernel computes."""
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


def test_another_thread_runs_while_a_gemm_computes():
    x = np.random.default_rng(0).standard_normal((4096, 576), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((1536, 576), dtype=np.float32)
    out = np.empty((4096, 1536), np.float32)
    cpu_gemm.matmul_nt(x[:4], w, out[:4], numba.get_num_threads())  # compiled (or loaded) first
    ticks, stop, started = [0], threading.Event(), threading.Event()

    def count():
        started.set()
        while not stop.is_set():
            ticks[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    started.wait()
    before = ticks[0]
    cpu_gemm.matmul_nt(x, w, out, numba.get_num_threads())  # ~7 GFLOP in one call
    during = ticks[0] - before
    stop.set()
    thread.join()
    # holding the GIL, the counter could move only at the call's edges (a switch or two)
    assert during > 1000, during
    np.testing.assert_allclose(out[:8], x[:8] @ w.T, rtol=2e-4, atol=2e-3)
