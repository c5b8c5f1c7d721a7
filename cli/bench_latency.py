"""`cupaged bench latency` and `cupaged bench chunked`: what a user of a stream waits for.

latency: c requests of the same shape submitted at once, for each c in --concurrency; time to first
token (from submission), inter-token latency (between successive tokens of a request) as median,
p90 and p99, and output tokens/s. One engine serves every level (max_num_seqs = the largest c).

chunked: K streams prefill, then decode --lead-steps steps (their median inter-token gap there is
"before p50"); then one long prompt arrives. The streams' inter-token latency while that prompt is
prefilled (from its arrival to its first token) is reported with chunked prefill on and off
(`EngineConfig.enable_chunked_prefill`) under a small `max_num_batched_tokens`: chunked, the prompt
is spread over steps that each still serve the streams; whole, one long step stalls them all.

    cupaged bench latency --backend cpu --concurrency 1,8,64 --input-len 128 --output-len 32
    cupaged bench chunked --backend cpu --streams 4 --long-input-len 2000 --max-num-batched-tokens 256
"""
from __future__ import annotations

import json
import os
import statistics
import time

import click
import numpy as np


def parse_levels(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of positive integers (e.g. 1,8,64)")
    return levels


def make_engine(model: str, backend: str, **config):
    from cupaged.config import EngineConfig
    from cupaged.engine.engine import LLMEngine
    return LLMEngine(EngineConfig(model=model, backend=backend, progress=False, **config))


def warm_up(engine, vocab_size: int, seed: int) -> None:
    """Two short requests through every code path (prefill, batched decode) before anything is timed."""
    from cupaged.cli.bench import run_throughput, synthetic_workload
    run_throughput(engine, synthetic_workload(2, (16, 16), (4, 4), vocab_size, seed + 1))


# ---- latency --------------------------------------------------------------------------------------
def measure_latency(engine, levels: list[int], input_len: tuple[int, int], output_len: tuple[int, int],
                    seed: int) -> list[dict]:
    """One row per concurrency level: summarize()'s numbers for c requests submitted at once."""
    from cupaged.cli.bench import run_throughput, synthetic_workload
    rows = []
    for c in levels:
        work = synthetic_workload(c, input_len, output_len, engine.model_config.vocab_size, seed)
        rows.append({"concurrency": c, **run_throughput(engine, work)})
    return rows


def format_latency(report: dict) -> str:
    lines = [f"cupaged bench latency: {report['backend']} backend on {report['machine']}",
             f"model {report['model']}, input {report['input_len']} tokens, output {report['output_len']} tokens "
             f"(seed {report['seed']}, greedy, ignore_eos)",
             f"{'concurrency':>11}  {'TTFT ms p50 / p90 / p99':>26}  {'ITL ms p50 / p90 / p99':>24}  "
             f"{'out tok/s':>9}"]
    for r in report["rows"]:
        ttft = " / ".join(_ms(r[k]) for k in ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms"))
        itl = " / ".join(_ms(r[k]) for k in ("median_itl_ms", "p90_itl_ms", "p99_itl_ms"))
        lines.append(f"{r['concurrency']:>11}  {ttft:>26}  {itl:>24}  {r['output_tok_s']:>9.1f}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def common_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic prompts.")(f)
    f = click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(f)
    f = click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help="Model to run.")(f)
    return f


@click.command()
@common_options
@click.option("--concurrency", default="1,8,64", show_default=True,
              help="Comma-separated numbers of requests submitted at once, one measurement each.")
@click.option("--input-len", default="128", show_default=True, help="Prompt length, N or LO:HI tokens.")
@click.option("--output-len", default="64", show_default=True, help="Output length, N or LO:HI tokens.")
def latency(model, backend, seed, as_json, concurrency, input_len, output_len):
    """Time to first token and inter-token latency (p50/p90/p99) at 1, 8 and 64 concurrent requests.

    Each level submits that many synthetic requests at once (fixed seed, greedy, ignore_eos) after a
    warm-up; TTFT counts from submission, so at high concurrency it includes waiting for the batch's
    other prefills. Output tokens/s is the level's output tokens over its wall time.
    """
    from cupaged.cli.bench import check_prompt_len, machine_name, parse_range
    levels = parse_levels(concurrency)
    in_range, out_range = parse_range(input_len, "--input-len"), parse_range(output_len, "--output-len")
    engine = make_engine(model, backend, max_num_seqs=max(levels))
    check_prompt_len(engine, in_range[1], "--input-len")
    warm_up(engine, engine.model_config.vocab_size, seed)
    report = {"machine": machine_name(), "backend": engine.ops.name, "model": model, "seed": seed,
              "input_len": input_len, "output_len": output_len,
              "rows": measure_latency(engine, levels, in_range, out_range, seed)}
    click.echo(json.dumps(report) if as_json else format_latency(report))


# ---- chunked prefill ------------------------------------------------------------------------------
def measure_stall(engine, streams: int, stream_input_len: int, long_input_len: int, lead_steps: int,
                  seed: int) -> dict:
    """Start `streams` streams and step until each has its first token (their own prefill, not
    counted), run `lead_steps` decode steps, then add one long prompt and step until its first token.
    Returns the streams' inter-token gaps in the lead steps ("before") and from the prompt's arrival
    to its first token ("during"), and the CPU this process used over those steps."""
    from cupaged.cli.bench import greedy_request, stamp_step
    prompt = _prompt_maker(engine.model_config.vocab_size, seed)
    stamps: dict[str, list[float]] = {}
    budget = lead_steps + long_input_len + 1  # more tokens than the lead and the prefill can take
    ids = [greedy_request(engine, f"stream-{i}", prompt(stream_input_len), budget) for i in range(streams)]
    while not all(stamps.get(rid) for rid in ids):
        stamp_step(engine, stamps)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(lead_steps):
        stamp_step(engine, stamps)
    arrival = time.perf_counter()
    long_id = greedy_request(engine, "long", prompt(long_input_len), 1)
    steps = 0
    while not stamps.get(long_id):
        stamp_step(engine, stamps)
        steps += 1
    cpu_cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    for rid in ids:
        engine.abort(rid)
    before, during = split_gaps([stamps[rid] for rid in ids], arrival)
    return {"before_median_itl_ms": _median_ms(before), "stream_tokens_before": len(before),
            "median_itl_ms": _median_ms(during),
            "p99_itl_ms": 1000 * float(np.percentile(during, 99)) if during else None,
            "max_stall_ms": 1000 * max(during) if during else None, "stream_tokens_during": len(during),
            "steps": steps, "long_ttft_ms": 1000 * (stamps[long_id][0] - arrival), "cpu_cores_used": cpu_cores}


def _prompt_maker(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.integers(100, vocab - 100, n).tolist()


def split_gaps(stamp_lists: list[list[float]], arrival: float) -> tuple[list[float], list[float]]:
    """The streams' gaps between successive tokens (seconds), split at the long prompt's arrival.
    before: gaps that start once every stream has its first token (no stream still prefilling) and
    end by the arrival; during: gaps that end after it. A gap that starts while some stream still
    waits for its first token holds that stream's prefill and is in neither."""
    decoding = max(s[0] for s in stamp_lists)
    gaps = [(a, b) for s in stamp_lists for a, b in zip(s, s[1:])]
    before = [b - a for a, b in gaps if decoding <= a and b <= arrival]
    during = [b - a for a, b in gaps if arrival < b]
    return before, during


def _median_ms(values: list[float]) -> float | None:
    return 1000 * statistics.median(values) if values else None


def format_chunked(report: dict) -> str:
    lines = [f"cupaged bench chunked: {report['backend']} backend on {report['machine']}",
             f"model {report['model']}: {report['streams']} streams decode ({report['stream_input_len']}-token "
             f"prompts); a {report['long_input_len']}-token prompt arrives; "
             f"max_num_batched_tokens {report['max_num_batched_tokens']}",
             f"{'chunked prefill':>15}  {'steps':>5}  {'ITL p50':>8}  {'ITL p99':>8}  {'max stall':>9}  "
             f"{'before p50':>10}  {'prompt TTFT':>11}"]
    for r in report["rows"]:
        lines.append(f"{'on' if r['enable_chunked_prefill'] else 'off':>15}  {r['steps']:>5}  "
                     f"{_ms(r['median_itl_ms']):>8}  {_ms(r['p99_itl_ms']):>8}  {_ms(r['max_stall_ms']):>9}  "
                     f"{_ms(r['before_median_itl_ms']):>10}  {_ms(r['long_ttft_ms']):>11}")
    return "\n".join(lines + chunked_legend(report))


def chunked_legend(report: dict) -> list[str]:
    """What each column of format_chunked's table measures, and the CPU the timed steps got."""
    rows = report["rows"]
    during = " / ".join(str(r["stream_tokens_during"]) for r in rows)
    before = " / ".join(str(r["stream_tokens_before"]) for r in rows)
    cores = " / ".join(f"{r['cpu_cores_used']:.1f}" for r in rows)
    return ["(milliseconds; counts and CPU are on / off)",
            "  steps: engine steps from the long prompt's arrival to its first token",
            f"  ITL p50 / p99, max stall: the streams' gaps between tokens that end in those steps ({during})",
            f"  before p50: the streams' median gap over the {report['lead_steps']} decode steps before the "
            f"prompt arrived ({before}),",
            "    after every stream's own prefill",
            "  prompt TTFT: from the long prompt's arrival to its first token",
            f"CPU: this process used {cores} of {os.cpu_count()} cores over the timed steps; well under the "
            "engine's threads",
            "  means other processes took the CPU and every time above is inflated"]


def _chunked_row(model, backend, enabled, streams, stream_input_len, long_input_len, max_num_batched_tokens,
                 lead_steps, seed) -> tuple[dict, str]:
    """One engine, warmed up, measured; returns (row, backend name). The engine is freed on return."""
    from cupaged.cli.bench import check_prompt_len
    engine = make_engine(model, backend, max_num_seqs=streams + 1, max_num_batched_tokens=max_num_batched_tokens,
                         enable_chunked_prefill=enabled)
    check_prompt_len(engine, long_input_len, "--long-input-len")
    check_prompt_len(engine, stream_input_len, "--stream-input-len")
    warm_up(engine, engine.model_config.vocab_size, seed)
    row = measure_stall(engine, streams, stream_input_len, long_input_len, lead_steps, seed)
    return {"enable_chunked_prefill": enabled, **row}, engine.ops.name


@click.command()
@common_options
@click.option("--streams", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests decoding when the long prompt arrives.")
@click.option("--stream-input-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompt length of each stream.")
@click.option("--long-input-len", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Length of the prompt that arrives while the streams decode.")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="The step's token budget (small, so that chunking matters).")
@click.option("--lead-steps", type=click.IntRange(min=2), default=8, show_default=True,
              help="Decode steps the streams run (after their own prefill) before the long prompt arrives.")
def chunked(model, backend, seed, as_json, streams, stream_input_len, long_input_len, max_num_batched_tokens,
            lead_steps):
    """Streams' inter-token latency while a long prompt is prefilled, chunked prefill on vs off.

    With chunking on, the prompt joins in chunks from the budget the streams' decodes leave, so each
    step stays short; off, it joins whole in one step that every stream waits for (the max stall).
    "before p50" is the streams' median inter-token gap over the lead decode steps, their prefill excluded.
    """
    from cupaged.cli.bench import machine_name
    rows = []
    for enabled in (True, False):
        row, backend_name = _chunked_row(model, backend, enabled, streams, stream_input_len, long_input_len,
                                         max_num_batched_tokens, lead_steps, seed)
        rows.append(row)
    report = {"machine": machine_name(), "backend": backend_name, "model": model, "seed": seed,
              "streams": streams, "stream_input_len": stream_input_len, "long_input_len": long_input_len,
              "max_num_batched_tokens": max_num_batched_tokens, "lead_steps": lead_steps, "rows": rows}
    click.echo(json.dumps(report) if as_json else format_chunked(report))
