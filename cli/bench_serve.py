"""`cupaged bench serve`: the OpenAI server under load, measured from its clients.

The server (`cupaged serve`'s app) runs in this process on a free loopback port; clients are httpx
streams in an asyncio loop of another thread, as separate processes' requests would arrive over
loopback. For each request rate (Poisson arrivals; "inf" sends every request at once), --requests
streaming completions of --input-len random prompt tokens and --output-len new tokens (ignore_eos)
are sent, while a prober asks /health every 20 ms. Per rate: request throughput, output tok/s,
TTFT (request sent -> first text chunk) and ITL (between text chunks) p50/p99, and /health latency
p50/p99 under that load.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import click
import numpy as np

from cupaged.cli.bench import machine_name, percentile_ms
from cupaged.cli.options import _fail, model_options


async def one_request(client, prompt: list[int], output_len: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise click.ClickException(f"the server answered {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else None, "itl": list(np.diff(stamps)), "end": time.perf_counter()}


async def probe(client, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await client.get("/health")
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)


async def run_rate(base: str, rate: float, prompts: list[list[int]], output_len: int, seed: int) -> dict:
    import httpx

    gaps = np.random.default_rng(seed).exponential(1 / rate, len(prompts)) if math.isfinite(rate) else [0] * len(prompts)
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=base, timeout=60) as prober:
        stop, health = asyncio.Event(), []
        probing = asyncio.create_task(probe(prober, stop, health))
        t0, tasks = time.perf_counter(), []
        for prompt, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one_request(client, prompt, output_len)))
        results = await asyncio.gather(*tasks)
        elapsed = max(r["end"] for r in results) - t0
        stop.set()
        await probing
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    return {"rate": rate, "requests": len(prompts), "elapsed_s": elapsed, "req_per_s": len(prompts) / elapsed,
            "out_tok_per_s": len(prompts) * output_len / elapsed,
            **{f"p{q}_{name}_ms": percentile_ms(values, q) for name, values in
               (("ttft", ttft), ("itl", itl), ("health", health)) for q in (50, 99)}}


def start_server(llm):
    """The app on a free loopback port in a thread; returns (base url, uvicorn server, thread)."""
    import uvicorn

    from cupaged.server.app import Server, build_app
    server = uvicorn.Server(uvicorn.Config(build_app(Server(llm, "bench", max_waiting_requests=100_000),
                                                     shutdown_grace_s=0),
                                           host="127.0.0.1", port=0, log_level="warning", backlog=4096))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server, thread


@click.command()
@model_options
@click.option("--rates", default="1,4,inf", show_default=True, help="Request rates per second, comma-separated.")
@click.option("--requests", "num_requests", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def serve(model, backend, max_model_len, kv_cache_memory, dtype, verbose, rates, num_requests, input_len,
          output_len, seed, as_json, **engine):
    """Load the OpenAI server: throughput, TTFT, ITL and /health latency at several request rates."""
    from cupaged.async_llm import AsyncLLM
    from cupaged.errors import CupagedError
    try:
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"{rates!r} is not a comma-separated list of rates (numbers or inf)",
                                 param_hint="--rates") from None
    if not rate_list or any(not r > 0 for r in rate_list):
        raise click.BadParameter("every rate must be > 0 (inf: all at once)", param_hint="--rates")
    try:
        llm = AsyncLLM(model=model, backend=backend, max_model_len=max_model_len, dtype=dtype, **kv_cache_memory,
                       **engine)
    except CupagedError as e:
        _fail(e)
    if input_len + output_len > llm.engine.max_model_len:
        raise click.BadParameter(f"input + output ({input_len + output_len}) exceed max_model_len "
                                 f"{llm.engine.max_model_len}", param_hint="--input-len")
    base, server, thread = start_server(llm)
    rng = np.random.default_rng(seed)
    vocab = llm.engine.model_config.vocab_size
    rows = []
    try:
        asyncio.run(run_rate(base, math.inf, [rng.integers(100, vocab - 100, input_len).tolist()], 2, seed))  # warm
        for rate in rate_list:
            prompts = [rng.integers(100, vocab - 100, input_len).tolist() for _ in range(num_requests)]
            rows.append(asyncio.run(run_rate(base, rate, prompts, output_len, seed)))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    if as_json:
        click.echo(json.dumps({"machine": machine_name(), "backend": llm.engine.ops.name, "rows": rows}))
        return
    click.echo(f"cupaged bench serve on {machine_name()}, {llm.engine.ops.name} backend: {num_requests} streaming "
               f"requests per rate, {input_len} prompt + {output_len} new tokens each")
    click.echo(f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
               f"{'/health p50':>12} {'p99':>8}   (ms)")
    for r in rows:
        cells = [r[k] or 0.0 for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p50_health_ms",
                                       "p99_health_ms")]
        click.echo(f"{r['rate']:>6g} {r['req_per_s']:7.2f} {r['out_tok_per_s']:10.1f} {cells[0]:9.1f} {cells[1]:8.1f} "
                   f"{cells[2]:8.1f} {cells[3]:8.1f} {cells[4]:12.2f} {cells[5]:8.2f}")
