"""`cupaged bench memory`: KV memory wasted by paged blocks vs contiguous max-length reservations.

A request trace (synthetic ShareGPT-like, or --trace FILE) is replayed through the memory alone, no
model (`cupaged.cli.memory_sim`): for the same KV memory, paged blocks of 8, 16 and 32 tokens (the
engine's own Scheduler and BlockManager) against one max_model_len slot per sequence. For each: wasted
memory (reserved but holding no token's K/V) as % of reserved, averaged over the replay and at peak
reservation, and concurrent requests (peak, mean). Parallel samples (n > 1) share their prompt blocks
through BlockManager.fork; the saving is measured against independent copies. With shared prefixes
(--prefix-len), a paged-16 run with the prefix cache on; its reuse is counted for first admissions
(each request's prompt, once) apart from re-admissions after preemption, which look up their own
tokens again. A PNG plots memory reserved vs used over time.

    cupaged bench memory                                   # 1000 synthetic requests, 32k tokens
    cupaged bench memory --n 4 --num-requests 300          # parallel samples sharing prompts
    cupaged bench memory --trace trace.jsonl --plot mem.png
"""
from __future__ import annotations

import json
import math

import click

PAGED_BLOCK_SIZES = (8, 16, 32)
TABLE_LEGEND = [
    "(waste mean: reserved tokens holding no K/V, % of reserved, mean over the steps that reserve any;",
    " at peak: the same, mean over the steps at peak reservation;",
    " peak / mean reqs: requests running at once, a request's n samples counted once: the most, and the mean",
    " over those steps; preempted: preemptions by recompute, events (a sequence may be preempted many times);",
    " drained: replay time of the step where the last request finished)"]


def build_trace(trace_file, num_requests, rate, n, prefix_len, prefix_groups, max_model_len, seed):
    from cupaged.cli.memory_trace import load_trace, synthetic_trace
    if trace_file:
        return load_trace(trace_file, max_model_len)
    return synthetic_trace(num_requests, rate, max_model_len, n=n, prefix_len=prefix_len,
                           prefix_groups=prefix_groups, seed=seed)


def replay(run) -> tuple[dict, object]:
    """Run a replay to its end; returns (summary dict, StepRecord)."""
    from cupaged.cli.memory_sim import SchedulerReplay, summarize_replay
    record = run.run()
    block_size = run.block_size if isinstance(run, SchedulerReplay) else None
    return {**summarize_replay(record, block_size), "preemptions": run.num_preemptions}, record


def run_memory_benchmark(trace, kv_tokens: int, max_model_len: int, step_s: float,
                         max_num_seqs: int = 256) -> tuple[dict, dict]:
    """Every memory over one trace. Returns (report, {name: StepRecord}) for the table and the plot."""
    from cupaged.cli.memory_sim import ContiguousMemory, Replay, SchedulerReplay
    rows, records = [], {}
    for bs in PAGED_BLOCK_SIZES:
        summary, records[f"paged-{bs}"] = replay(SchedulerReplay(trace, kv_tokens, bs, step_s, max_num_seqs))
        rows.append({"memory": f"paged-{bs}", "block_size": bs, **summary})
    summary, records["contiguous"] = replay(Replay(trace, ContiguousMemory(kv_tokens, max_model_len), step_s,
                                                   max_num_seqs))
    rows.append({"memory": "contiguous", "block_size": None, **summary})
    report = {"kv_tokens": kv_tokens, "max_model_len": max_model_len, "step_ms": 1000 * step_s,
              "trace": describe_trace(trace), "rows": rows, "sharing": None, "prefix_cache": None}
    if any(req.n > 1 for req in trace):
        copies, _ = replay(SchedulerReplay(trace, kv_tokens, 16, step_s, max_num_seqs, share=False))
        fork = next(r for r in rows if r["memory"] == "paged-16")
        report["sharing"] = {"block_size": 16, "fork": fork, "copies": copies}
    if any(req.prefix_id is not None for req in trace):
        report["prefix_cache"] = measure_prefix_cache(trace, kv_tokens, step_s, max_num_seqs)
    return report, records


def measure_prefix_cache(trace, kv_tokens: int, step_s: float, max_num_seqs: int) -> dict:
    """paged-16 with the engine's prefix cache on: waste, concurrency, blocks saved by sharing (prefix
    hits and forks), and the prefix-cache lookups counted apart: first admissions (each request's
    prompt once; its n > 1 samples fork from it) and re-admissions after preemption, which look up
    the prompt and the tokens generated so far and often find their own blocks still cached. The
    cache's own counters (prefix_cache_queries / hits, as vLLM counts) add the two."""
    from cupaged.cli.memory_sim import SchedulerReplay
    run = SchedulerReplay(trace, kv_tokens, 16, step_s, max_num_seqs, prefix_caching=True)
    summary, _ = replay(run)
    queries, hits, reuse = run.bm.prefix_cache_queries, run.bm.prefix_cache_hits, run.bm.reuse
    return {**summary, "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "all_admissions_hit_rate_pct": _pct(hits, queries),
            "first_admission_tokens": reuse.first_tokens, "first_admission_reused": reuse.first_reused,
            "hit_rate_pct": _pct(reuse.first_reused, reuse.first_tokens), "readmissions": reuse.readmissions,
            "readmitted_tokens": reuse.readmitted_tokens, "readmitted_reused": reuse.readmitted_reused}


def _pct(part: int, whole: int) -> float | None:
    return 100 * part / whole if whole else None


def describe_trace(trace) -> dict:
    inputs = [r.input_len for r in trace]
    outputs = [r.output_len for r in trace]
    return {"requests": len(trace), "sequences": sum(r.n for r in trace), "prompt_tokens": sum(inputs),
            "mean_input_len": sum(inputs) / len(trace), "mean_output_len": sum(outputs) / len(trace),
            "max_input_len": max(inputs), "max_output_len": max(outputs),
            "last_arrival_s": max(r.arrival for r in trace),
            "with_prefix": sum(r.prefix_id is not None for r in trace)}


def format_report(report: dict) -> str:
    t = report["trace"]
    lines = [f"cupaged bench memory: {report['source']}",
             f"  {t['requests']} requests ({t['sequences']} sequences, {t['prompt_tokens']} prompt tokens), "
             f"mean input {t['mean_input_len']:.0f}, mean output {t['mean_output_len']:.0f} tokens, arrivals over {t['last_arrival_s']:.1f} s",
             f"  KV memory {report['kv_tokens']} tokens for each; contiguous reserves max_model_len "
             f"{report['max_model_len']} per sequence; one step (a token per sequence) = {report['step_ms']:g} ms",
             "",
             f"{'memory':<11} {'waste mean':>10} {'at peak':>8} {'peak reqs':>9} {'mean reqs':>9} "
             f"{'preempted':>9} {'drained':>9}"]
    for r in report["rows"]:
        lines.append(f"{r['memory']:<11} {r['waste_mean_pct']:>9.1f}% {r['waste_peak_pct']:>7.1f}% "
                     f"{r['peak_requests']:>9} {r['mean_requests']:>9.1f} {r['preemptions']:>9} {r['drain_s']:>8.1f}s")
    lines += TABLE_LEGEND
    lines += format_sharing(report["sharing"]) + format_prefix(report["prefix_cache"])
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)


def format_sharing(sharing: dict | None) -> list[str]:
    if not sharing:
        return ["parallel samples: no request has n > 1 (try --n 4)"]
    fork, copies = sharing["fork"], sharing["copies"]
    return [f"parallel samples (n > 1), paged-16: fork shares the prompt blocks, saving "
            f"{fork['saved_blocks_mean']:.0f} blocks on average (peak {fork['saved_blocks_peak']}), "
            f"{fork['saved_pct']:.1f}% of what independent copies would hold;",
            f"  peak / mean concurrent requests {fork['peak_requests']} / {fork['mean_requests']:.1f} shared vs "
            f"{copies['peak_requests']} / {copies['mean_requests']:.1f} with copies; drained in "
            f"{fork['drain_s']:.1f} s vs {copies['drain_s']:.1f} s"]


def format_prefix(prefix: dict | None) -> list[str]:
    if prefix is None:
        return ["prefix cache: no request has a prefix_id"]
    rate = "-" if prefix["hit_rate_pct"] is None else f"{prefix['hit_rate_pct']:.1f}%"
    return [f"prefix cache, paged-16: first admissions reused {prefix['first_admission_reused']} of their "
            f"{prefix['first_admission_tokens']} prompt tokens from the cache (hit rate {rate});",
            f"  {prefix['readmissions']} re-admissions after preemption found {prefix['readmitted_reused']} of "
            f"the {prefix['readmitted_tokens']} tokens they looked up",
            "  (prompt and output so far, their own blocks often still cached; the cache's own counters add "
            f"both: {prefix['prefix_cache_hits']} of {prefix['prefix_cache_queries']});",
            f"  {prefix['saved_blocks_mean']:.0f} blocks shared on average ({prefix['saved_pct']:.1f}% of the blocks "
            f"the running sequences reference);",
            f"  peak / mean concurrent requests {prefix['peak_requests']} / {prefix['mean_requests']:.1f}, "
            f"waste {prefix['waste_mean_pct']:.1f}%"]


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a ClickException that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("the memory plot needs matplotlib: pip install 'cupaged[bench]' "
                                   "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_memory(plt, records: dict, kv_tokens: int, path: str) -> None:
    """Reserved vs used KV tokens over time, one panel per memory in records."""
    fig, axes = plt.subplots(len(records), 1, figsize=(8, 2.6 * len(records)), sharex=True, squeeze=False)
    for ax, (name, rec) in zip(axes[:, 0], records.items()):
        ax.fill_between(rec.time_s, rec.reserved_tokens, step="post", color="tab:orange", alpha=0.35,
                        label="reserved")
        ax.fill_between(rec.time_s, rec.used_tokens, step="post", color="tab:blue", alpha=0.8,
                        label="holding K/V")
        ax.axhline(kv_tokens, color="grey", lw=0.8, ls="--", label="KV memory")
        ax.set_title(name, fontsize=10, loc="left")
        ax.set_ylabel("tokens")
        ax.set_ylim(0, kv_tokens * 1.08)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@click.command()
@click.option("--trace", "trace_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help='JSONL trace, one {"arrival": s, "input_len": n, "output_len": m} a line (optional "n", '
                   '"prefix_id", "prefix_len"). Default: a synthetic ShareGPT-like trace.')
@click.option("--num-requests", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Synthetic trace: number of requests.")
@click.option("--rate", type=float, default=20.0, show_default=True,
              help="Synthetic trace: Poisson arrivals per second (inf: all at once).")
@click.option("--n", "n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Synthetic trace: parallel samples per request (sharing the prompt).")
@click.option("--prefix-len", type=click.IntRange(min=0), default=0, show_default=True,
              help="Synthetic trace: tokens of a shared prompt prefix (0: none).")
@click.option("--prefix-groups", type=click.IntRange(min=1), default=4, show_default=True,
              help="Synthetic trace: distinct shared prefixes.")
@click.option("--kv-tokens", type=click.IntRange(min=32), default=32768, show_default=True,
              help="KV memory, in tokens, given to every layout.")
@click.option("--max-model-len", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Longest sequence: the contiguous layout reserves this much per sequence.")
@click.option("--step-ms", type=float, default=20.0, show_default=True,
              help="Time of one step (one token for every running sequence).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plot", "plot_path", default="memory.png", show_default=True, help="PNG of memory over time.")
@click.option("--no-plot", is_flag=True, help="Write no PNG (no matplotlib needed).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def memory(trace_file, num_requests, rate, n, prefix_len, prefix_groups, kv_tokens, max_model_len, step_ms,
           max_num_seqs, seed, plot_path, no_plot, as_json):
    """KV memory waste: paged blocks (8, 16, 32 tokens) vs a contiguous max-length slot per sequence.

    Replays a request trace through the memory alone (no model): paged layouts through the engine's
    own scheduler and block manager (admission, preemption by recompute, forks), the contiguous one
    through a loop that admits while slots last; every running sequence grows a token per step.
    Reports wasted memory (reserved, holding no K/V) as % of reserved, mean and at peak, peak and
    mean concurrent requests, the blocks parallel samples save by sharing their prompt, and plots
    reserved vs used memory over time for paged-16 and contiguous.
    """
    from cupaged.errors import TraceError
    if not rate > 0 or math.isnan(rate) or step_ms <= 0:
        raise click.BadParameter("--rate and --step-ms must be > 0")
    plt = None if no_plot else require_matplotlib()
    try:
        trace = build_trace(trace_file, num_requests, rate, n, prefix_len, prefix_groups, max_model_len, seed)
        report, records = run_memory_benchmark(trace, kv_tokens, max_model_len, step_ms / 1000, max_num_seqs)
    except TraceError as e:
        raise click.ClickException(str(e)) from e
    report["source"] = f"trace {trace_file}" if trace_file else f"synthetic ShareGPT-like trace, {rate:g} req/s, " \
                                                                f"seed {seed}"
    if plt is not None:
        plot_memory(plt, {k: records[k] for k in ("paged-16", "contiguous")}, kv_tokens, plot_path)
        report["plot"] = plot_path
    click.echo(json.dumps(report) if as_json else format_report(report))
