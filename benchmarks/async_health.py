"""How long a coroutine on AsyncLLM's event loop waits while the engine thread runs long prefill steps
on the CPU backend: the latency a `/health` request would see on top of its own work.

A ticker coroutine sleeps --tick-ms and records how late it wakes; meanwhile --prompts prompts of
--prompt-len tokens (a 2,048-token prefill step each, with the default budget) run to one token each.
Prints p50 / p99 / max lateness during the prefills and the prefill time, plus the same ticker with
the engine idle as the floor.

    python benchmarks/async_health.py
"""
from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from cupaged.async_llm import AsyncLLM
from cupaged.sampling_params import SamplingParams


async def ticker(tick_s: float, stop: asyncio.Event) -> list[float]:
    late = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(tick_s)
        late.append(time.perf_counter() - t0 - tick_s)
    return late


async def run(llm: AsyncLLM, prompts: list[list[int]], tick_s: float) -> tuple[list[float], float]:
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(tick_s, stop))
    t0 = time.perf_counter()

    async def one(ids):
        async for _ in llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0)):
            pass

    await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - t0
    stop.set()
    return await tick, elapsed


async def idle(tick_s: float, seconds: float) -> list[float]:
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(tick_s, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await tick


def show(name: str, late: list[float]) -> None:
    ms = np.array(late) * 1e3
    print(f"{name:34} ticks {len(ms):5}  late p50 {np.median(ms):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms  "
          f"max {ms.max():6.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--tick-ms", type=float, default=10.0)
    args = ap.parse_args()
    llm = AsyncLLM(model=args.model, backend="cpu", kv_cache_memory=1 << 30, max_model_len=4096,
                   enable_prefix_caching=False, progress=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 49_000, size=args.prompt_len).tolist() for _ in range(args.prompts)]
    asyncio.run(run(llm, prompts[:1], args.tick_ms / 1e3))  # warm: kernels compiled and loaded
    floor = asyncio.run(idle(args.tick_ms / 1e3, 2.0))
    late, elapsed = asyncio.run(run(llm, prompts, args.tick_ms / 1e3))
    print(f"AsyncLLM on the CPU backend: {args.prompts} prompts of {args.prompt_len} tokens, "
          f"{elapsed:.1f} s of prefill ({args.prompts * args.prompt_len / elapsed:.0f} tok/s), "
          f"ticker every {args.tick_ms:g} ms")
    show("engine idle", floor)
    show("during the prefill steps", late)
    asyncio.run(llm.shutdown(grace_s=0))


if __name__ == "__main__":
    main()
