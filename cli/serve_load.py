"""The load `cupaged bench serve` sends, and what it measures from the client side, against any
OpenAI-compatible server (ours, vLLM's, llama.cpp's llama-server).

A workload is a list of `Item`s: seeded random token-id prompts with lengths drawn from ranges, or the
lines of a JSONL file. Each item is one streaming POST /v1/completions (ignore_eos, so the output has
exactly its length where the server honours it; usage is asked for in the stream). Arrivals are
Poisson at the request rate (inf: all at once), at most --max-concurrency in flight, while a prober
asks /health every 20 ms. TTFT runs from sending to the first text chunk, ITL between text chunks,
E2E from sending to the last byte.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass

import click
import numpy as np

from cupaged.cli.bench import percentile_ms


@dataclass
class Item:
    prompt: list[int] | str   # token ids, or text
    output_len: int           # max_tokens


def random_workload(count: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                    rng: np.random.Generator) -> list[Item]:
    """count prompts of random token ids in [100, vocab - 100); each length drawn uniformly from
    [len * (1 - range_ratio), len * (1 + range_ratio)] (at least 1)."""
    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, count)

    ins, outs = lengths(input_len), lengths(output_len)
    return [Item(rng.integers(100, vocab - 100, n).tolist(), int(m)) for n, m in zip(ins, outs)]


def jsonl_workload(path: str, count: int) -> list[Item]:
    """count items from a JSONL file of {"prompt": text or token ids, "output_len" (or "max_tokens"): n},
    in order, starting over if the file has fewer lines."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, n = row["prompt"], row.get("output_len", row.get("max_tokens"))
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                raise click.BadParameter(f"{path}:{number}: not a JSON object with a prompt ({e})",
                                         param_hint="--dataset") from None
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
                raise click.BadParameter(f"{path}:{number}: prompt must be text or a list of token ids",
                                         param_hint="--dataset")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise click.BadParameter(f"{path}:{number}: output_len must be an integer >= 1, got {n!r}",
                                         param_hint="--dataset")
            items.append(Item(prompt, n))
    if not items:
        raise click.BadParameter(f"{path} has no requests", param_hint="--dataset")
    return [items[i % len(items)] for i in range(count)]


async def one_request(client, model: str, item: Item) -> dict:
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0, stamps, usage = time.perf_counter(), [], None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return {"error": f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"}
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except Exception as e:  # noqa: BLE001 (a failed request is counted, the run goes on)
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": stamps[0] - t0 if stamps else None, "itl": list(np.diff(stamps)), "e2e": end - t0,
            "end": end, "tokens": tokens}


async def probe(client, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            reply = await client.get("/health")
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 (a server without /health: no figure)
            return
        await asyncio.sleep(0.02)


async def run_rate(base: str, model: str, headers: dict, rate: float, items: list[Item], seed: int,
                   max_concurrency: int | None) -> dict:
    """One rate's run: every item sent, then the summary row."""
    import httpx

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, len(items)) if math.isfinite(rate) else np.zeros(len(items))
    gate = asyncio.Semaphore(max_concurrency or len(items))
    limits = httpx.Limits(max_connections=(max_concurrency or len(items)) + 4)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=3600, limits=limits) as client, \
            httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as prober:
        stop, health = asyncio.Event(), []
        probing = asyncio.create_task(probe(prober, stop, health))

        async def gated(item: Item) -> dict:
            async with gate:
                return await one_request(client, model, item)

        t0, tasks = time.perf_counter(), []
        for item, gap in zip(items, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(gated(item)))
        results = await asyncio.gather(*tasks)
        stop.set()
        await probing
    return summarize(rate, max_concurrency, results, t0, health)


def summarize(rate: float, max_concurrency: int | None, results: list[dict], t0: float,
              health: list[float]) -> dict:
    done = [r for r in results if "error" not in r]
    if not done:
        raise click.ClickException(f"every request failed; the first: {results[0]['error']}")
    elapsed = max(r["end"] for r in done) - t0
    tokens = sum(r["tokens"] for r in done)
    series = {"ttft": [r["ttft"] for r in done if r["ttft"] is not None],
              "itl": [x for r in done for x in r["itl"]], "e2e": [r["e2e"] for r in done]}
    row = {"rate": rate, "max_concurrency": max_concurrency, "requests": len(results),
           "failed": len(results) - len(done), "first_error": next((r["error"] for r in results if "error" in r), None),
           "elapsed_s": elapsed, "req_per_s": len(done) / elapsed, "output_tokens": tokens,
           "out_tok_per_s": tokens / elapsed}
    for name, values in series.items():
        row.update({f"p{q}_{name}_ms": percentile_ms(values, q) for q in (50, 90, 99)})
    row.update({f"p{q}_health_ms": percentile_ms(health, q) for q in (50, 99)})
    return row
