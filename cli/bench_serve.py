"""`cupaged bench serve`, shaped like `vllm bench serve`: an OpenAI-compatible server under a seeded
synthetic (or JSONL) load, measured from its clients (cli/serve_load.py).

Without --base-url the server is `cupaged serve`'s app on --model, in this process on a free
loopback port (the clients are httpx streams on an asyncio loop, as other processes' requests would
arrive over loopback). With --base-url nothing loads: the same load goes to that server, so the
same command measures another engine's server (vLLM's, llama.cpp's llama-server). Per request rate:
request throughput, output tokens/s, TTFT / ITL / E2E p50, p90 and p99, and /health latency under
that load; --result-file writes it all as JSON.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import click
import numpy as np

from cupaged.cli.bench import machine_name
from cupaged.cli.options import _fail, model_options
from cupaged.cli.serve_load import Item, jsonl_workload, random_workload, run_rate


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


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of rates (numbers or inf)",
                                 param_hint="--request-rate") from None
    if not rates or any(not r > 0 for r in rates):
        raise click.BadParameter("every rate must be > 0 (inf: all at once)", param_hint="--request-rate")
    return rates


def remote_model(base: str, headers: dict, name: str | None) -> str:
    """The model name to send: --served-model-name, else the first the server lists."""
    import httpx
    if name:
        return name
    try:
        reply = httpx.get(base + "/v1/models", headers=headers, timeout=30)
        reply.raise_for_status()
        return reply.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise click.ClickException(f"could not ask {base}/v1/models for a model name ({e}); "
                                   "pass --served-model-name") from e


@click.command()
@model_options
@click.option("--base-url", default=None, help="An OpenAI-compatible server to measure (default: start "
              "cupaged's on --model in this process).")
@click.option("--served-model-name", default=None, help="With --base-url: the model name to send "
              "(default: the first in its /v1/models).")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", show_envvar=True,
              help="With --base-url: sent as 'Authorization: Bearer KEY'.")
@click.option("--request-rate", "rates", default="1,4,inf", show_default=True,
              help="Requests per second (Poisson arrivals), comma-separated for several runs; inf sends all at once.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="At most this many requests in flight (default: no bound).")
@click.option("--requests", "num_requests", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests per rate.")
@click.option("--input-len", type=click.IntRange(min=1), default=64, show_default=True,
              help="Random prompts: mean length in tokens.")
@click.option("--output-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="Random prompts: mean new tokens.")
@click.option("--range-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Lengths are drawn from [len * (1 - r), len * (1 + r)].")
@click.option("--vocab-size", type=click.IntRange(min=256), default=None,
              help="With --base-url: random token ids are drawn below this (default 32000).")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), default=None,
              help='JSONL of {"prompt": text or token ids, "output_len": n} instead of random prompts.')
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--result-file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the settings and every row as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the table.")
def serve(model, backend, max_model_len, kv_cache_memory, dtype, verbose, base_url, served_model_name, api_key,
          rates, max_concurrency, num_requests, input_len, output_len, range_ratio, vocab_size, dataset, seed,
          result_file, as_json, **engine):
    """Load an OpenAI-compatible server: throughput, TTFT, ITL, E2E and /health latency per request rate."""
    rate_list = parse_rates(rates)
    rng = np.random.default_rng(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    llm = server = thread = None
    if base_url is None:
        llm = load(model, backend, max_model_len, dtype, kv_cache_memory, engine)
        name, vocab = "bench", llm.engine.model_config.vocab_size
        longest = int(input_len * (1 + range_ratio)) + int(output_len * (1 + range_ratio))
        if dataset is None and longest > llm.engine.max_model_len:
            raise click.BadParameter(f"input + output lengths (up to {longest}) exceed max_model_len "
                                     f"{llm.engine.max_model_len}", param_hint="--input-len")
        base_url, server, thread = start_server(llm)
    else:
        base_url = base_url.rstrip("/").removesuffix("/v1")
        name, vocab = remote_model(base_url, headers, served_model_name), vocab_size or 32000

    def workload() -> list[Item]:
        if dataset is not None:
            return jsonl_workload(dataset, num_requests)
        return random_workload(num_requests, input_len, output_len, range_ratio, vocab, rng)

    rows = []
    try:
        asyncio.run(run_rate(base_url, name, headers, math.inf, workload()[:1], seed, None))  # warm
        for rate in rate_list:
            rows.append(asyncio.run(run_rate(base_url, name, headers, rate, workload(), seed, max_concurrency)))
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(timeout=30)
    report = {"machine": machine_name(), "base_url": base_url if llm is None else None,
              "backend": llm.engine.ops.name if llm is not None else None, "model": name if llm is None else model,
              "workload": {"dataset": dataset, "requests": num_requests, "input_len": input_len,
                           "output_len": output_len, "range_ratio": range_ratio, "seed": seed}, "rows": rows}
    if result_file:
        with open(result_file, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    if as_json:
        click.echo(json.dumps(report))
        return
    print_table(report)


def load(model, backend, max_model_len, dtype, kv_cache_memory, engine):
    from cupaged.async_llm import AsyncLLM
    from cupaged.errors import CupagedError
    try:
        return AsyncLLM(model=model, backend=backend, max_model_len=max_model_len, dtype=dtype, **kv_cache_memory,
                        **engine)
    except CupagedError as e:
        _fail(e)


def print_table(report: dict) -> None:
    w = report["workload"]
    what = f"{w['dataset']}" if w["dataset"] else (f"{w['input_len']} prompt + {w['output_len']} new tokens"
                                                   + (f" (+-{w['range_ratio']:.0%})" if w["range_ratio"] else ""))
    where = f"{report['base_url']}" if report["base_url"] else f"cupaged serve, {report['backend']} backend"
    click.echo(f"cupaged bench serve on {report['machine']}, {where}: {w['requests']} streaming requests per "
               f"rate, {what}")
    click.echo(f"{'rate':>5} {'conc':>5} {'fail':>4} {'req/s':>6} {'out tok/s':>9} | {'TTFT p50':>8} {'p90':>7} "
               f"{'p99':>7} | {'ITL p50':>7} {'p90':>6} {'p99':>6} | {'E2E p50':>7} {'p90':>7} {'p99':>7} | "
               f"{'/health p99':>11}  (ms)")
    for r in report["rows"]:
        cell = {k: (v if v is not None else float("nan")) for k, v in r.items()}
        click.echo(f"{r['rate']:>5g} {r['max_concurrency'] or '-':>5} {r['failed']:>4} {r['req_per_s']:6.2f} "
                   f"{r['out_tok_per_s']:9.1f} | {cell['p50_ttft_ms']:8.1f} {cell['p90_ttft_ms']:7.1f} "
                   f"{cell['p99_ttft_ms']:7.1f} | {cell['p50_itl_ms']:7.1f} {cell['p90_itl_ms']:6.1f} "
                   f"{cell['p99_itl_ms']:6.1f} | {cell['p50_e2e_ms']:7.0f} {cell['p90_e2e_ms']:7.0f} "
                   f"{cell['p99_e2e_ms']:7.0f} | {cell['p99_health_ms']:11.2f}")
        if r["failed"]:
            click.echo(f"      {r['failed']} failed; the first: {r['first_error']}")
