"""`cupaged bench`: speed as physics (tokens/s), with a fixed-seed synthetic workload."""
from __future__ import annotations

import json
import platform
import re
import statistics
import time

import click
import numpy as np

from cupaged.util import cdiv


def parse_range(text: str, name: str | None = None) -> tuple[int, int]:
    """'128' -> (128, 128); '64:256' -> (64, 256). name is the option, for the error."""
    lo, _, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        lo_i = hi_i = 0
    if not 1 <= lo_i <= hi_i:
        raise click.BadParameter(f"{text!r} is not a length N or a range LO:HI with 1 <= LO <= HI", param_hint=name)
    return lo_i, hi_i


def check_prompt_len(engine, longest: int, name: str) -> None:
    """A usage error (exit 2) when a prompt of `longest` tokens leaves no room in the model's context."""
    if longest >= engine.max_model_len:
        raise click.BadParameter(f"{longest} tokens leave no room to generate: the context length of "
                                 f"{engine.config.model} is {engine.max_model_len}", param_hint=name)


def synthetic_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                       vocab_size: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)] drawn with a fixed seed; the transformers script uses it too."""
    rng = np.random.default_rng(seed)
    work = []
    for _ in range(num_requests):
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        work.append((rng.integers(100, vocab_size - 100, n_in).tolist(), n_out))
    return work


def machine_name() -> str:
    """'AMD EPYC, 2 cores (x86_64)': the CPU model from /proc/cpuinfo where there is one."""
    import os
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model or platform.system()}, {os.cpu_count()} cores ({platform.machine()})"


def greedy_request(engine, request_id: str, ids: list[int], n_out: int) -> str:
    """Queue a greedy request that runs exactly n_out tokens (ignore_eos)."""
    from cupaged.sampling_params import SamplingParams
    return engine.add_request(request_id, {"prompt_token_ids": ids},
                              SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True))


def stamp_step(engine, stamps: dict[str, list[float]]) -> None:
    """One engine step; append the wall time once per new output token to stamps[request_id]."""
    outs = engine.step()
    now = time.perf_counter()
    for out in outs:
        got = stamps.setdefault(out.request_id, [])
        got.extend([now] * (len(out.outputs[0].token_ids) - len(got)))


def run_throughput(engine, work: list[tuple[list[int], int]]) -> dict:
    """Run every request at once through engine; time each token as it comes."""
    start = time.perf_counter()
    stamps: dict[str, list[float]] = {}
    for i, (ids, n_out) in enumerate(work):
        stamps[greedy_request(engine, f"bench-{i}", ids, n_out)] = []
    while engine.has_unfinished_requests():
        stamp_step(engine, stamps)
    elapsed = time.perf_counter() - start
    return summarize(work, stamps.values(), start, elapsed)


def percentile_ms(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation) of values in seconds, in ms; None if empty."""
    return 1000 * float(np.percentile(values, q)) if values else None


def summarize(work, stamps, start: float, elapsed: float) -> dict:
    """Token counts, tokens/s, and TTFT (from start) and inter-token latency: median, p90, p99."""
    n_in = sum(len(ids) for ids, _ in work)
    n_out = sum(n for _, n in work)
    ttft = [s[0] - start for s in stamps if s]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"requests": len(work), "input_tokens": n_in, "output_tokens": n_out, "elapsed_s": elapsed,
            "output_tok_s": n_out / elapsed, "total_tok_s": (n_in + n_out) / elapsed,
            "median_ttft_ms": 1000 * statistics.median(ttft) if ttft else None,
            "median_itl_ms": 1000 * statistics.median(itl) if itl else None,
            **{f"p{q}_{name}_ms": percentile_ms(values, q) for name, values in (("ttft", ttft), ("itl", itl))
               for q in (90, 99)}}


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_result(title: str, result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{title} on {result.get('machine', machine_name())}")
    click.echo(f"  requests          {result['requests']} ({result['input_tokens']} in, {result['output_tokens']} out)")
    click.echo(f"  elapsed           {result['elapsed_s']:.2f} s")
    click.echo(f"  output tokens/s   {result['output_tok_s']:.1f}")
    click.echo(f"  total tokens/s    {result['total_tok_s']:.1f}")
    click.echo(f"  median TTFT       {result['median_ttft_ms']:.1f} ms")
    if result["median_itl_ms"] is not None:
        click.echo(f"  median ITL        {result['median_itl_ms']:.1f} ms")
    if result.get("peak_rss_mib") is not None:
        click.echo(f"  peak RSS          {result['peak_rss_mib']:.0f} MiB")


@click.group()
def bench() -> None:
    """Benchmarks that print tokens/s, latency, memory, GB/s and TF/s: serving throughput, latency at
    1-64 concurrent requests, chunked prefill's effect on streams, KV memory waste, start-up, kernels (GPU)."""


@bench.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help="Model to run.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--num-requests", "-n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most requests running at once (max_num_seqs).")
@click.option("--input-len", default="64:256", show_default=True, help="Prompt length, N or LO:HI tokens.")
@click.option("--output-len", default="64:128", show_default=True, help="Output length, N or LO:HI tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "q8_0"]), default="auto",
              show_default=True, help="As in chat: bfloat16 on the CPU stores the weight matrices in bf16.")
@click.option("--warmup/--no-warmup", default=True, show_default=True, help="Run one short request first, and write the KV blocks the run will take.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def throughput(model, backend, num_requests, concurrency, input_len, output_len, dtype, seed, warmup, as_json):
    """Offline throughput: N synthetic requests (fixed seed, ignore_eos), all submitted at once; with
    the process's peak RSS."""
    from cupaged.config import EngineConfig
    from cupaged.engine.engine import LLMEngine
    in_range, out_range = parse_range(input_len, "--input-len"), parse_range(output_len, "--output-len")
    engine = LLMEngine(EngineConfig(model=model, backend=backend, dtype=dtype, max_num_seqs=concurrency))
    check_prompt_len(engine, in_range[1], "--input-len")
    work = synthetic_workload(num_requests, in_range, out_range, engine.model_config.vocab_size, seed)
    if warmup:
        warm_up(engine, work)
    result = run_throughput(engine, work)
    result.update(machine=machine_name(), backend=engine.ops.name, dtype=engine.ops.dtype_name,
                  concurrency=concurrency, model=model, peak_rss_mib=peak_rss_mib())
    print_result(f"cupaged {engine.ops.name} ({engine.ops.dtype_name})", result, as_json)


def warm_up(engine, work: list[tuple[list[int], int]]) -> None:
    """The engine's warm-up (one short request, cupaged.engine.warm_up: every kernel loaded), then the KV
    blocks the workload's prompts will take written once (ModelRunner.touch_kv_blocks), as llama.cpp
    clears its KV cache before llama-bench times anything. Only the prompts': touching the outputs'
    blocks too put them in memory beside the prefill's buffers, ~30 MiB more peak RSS at 16 streams."""
    from cupaged.engine.warm_up import warm_up as warm_up_engine
    warm_up_engine(engine)
    engine.runner.touch_kv_blocks(1 + sum(cdiv(len(ids), engine.block_manager.block_size) for ids, _ in work))


STARTUP_SCRIPT = """
import time
t0 = time.perf_counter()
from cupaged import LLM, SamplingParams
llm = LLM(model={model!r}, backend={backend!r}, progress=False)
t1 = time.perf_counter()
llm.generate("Hello", SamplingParams(temperature=0, max_tokens=1))
print(t1 - t0, time.perf_counter() - t0)
"""


@bench.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help="Model to start.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def startup(model, backend, repeats):
    """Warm start: a fresh process loads the (already converted) model and produces its first token."""
    import subprocess
    import sys
    from cupaged.weights.store import resolve_model
    resolve_model(model)  # convert first, so only the warm start is timed
    script = STARTUP_SCRIPT.format(model=model, backend=backend)
    runs = []
    for _ in range(repeats + 1):  # the first run fills Numba's cache if it is cold
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if out.returncode != 0:  # the child's own last line says why (no CuPy, no GPU, ...)
            last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
            last = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
            raise click.ClickException(f"the start-up run failed: {last}")
        runs.append([float(v) for v in out.stdout.split()])
    load = statistics.median(r[0] for r in runs[1:])
    first = statistics.median(r[1] for r in runs[1:])
    click.echo(f"warm start on {machine_name()}: load {load:.2f} s, first token {first:.2f} s "
               f"(median of {repeats}, from `import cupaged` to the token)")


from cupaged.cli.bench_kernels import kernels  # noqa: E402  (registers `cupaged bench kernels`)
from cupaged.cli.bench_latency import chunked, latency  # noqa: E402
from cupaged.cli.bench_memory import memory  # noqa: E402
from cupaged.cli.bench_overhead import overhead  # noqa: E402
from cupaged.cli.bench_serve import serve  # noqa: E402  (`cupaged bench serve`)

for command in (latency, chunked, memory, kernels, overhead, serve):
    bench.add_command(command)
