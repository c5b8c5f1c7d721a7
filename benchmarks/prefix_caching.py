"""What prefix caching costs when nothing is shared, and what it saves when a prompt is.

    python benchmarks/prefix_caching.py --runs 5

(a) Throughput at a 0% hit rate: every run submits fresh random prompts (seeded by run) to two
    engines, one with prefix caching and one without, in alternating order. Reports the median
    tokens/s of each and the median of the per-run ratios (wall clock, and tokens per CPU second,
    which other busy processes disturb less), plus the time spent in the cache's own bookkeeping
    (hashing, lookups, naming blocks), timed directly, as a share of the run: the only code that
    differs between the two engines, so the number that survives a noisy machine.
(b) Time to first token after a shared ~1,000-token system prompt: one request fills the cache,
    then each following request (the same prompt plus a short distinct suffix) runs alone;
    reports the median TTFT with caching on and off.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numba
import numpy as np

from cupaged.cli.bench import machine_name, parse_range, run_throughput, synthetic_workload
from cupaged.config import EngineConfig
from cupaged.engine.engine import LLMEngine
from cupaged.sampling_params import SamplingParams


def make_engine(model: str, caching: bool, max_model_len: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, backend="cpu", enable_prefix_caching=caching, progress=False,
                                  kv_cache_memory=512 * 2**20, max_model_len=max_model_len))


def time_bookkeeping(engine: LLMEngine) -> list[float]:
    """Wrap the block manager's prefix-cache calls with a timer; returns the running total [s]."""
    bm, total = engine.block_manager, [0.0]
    for name in ("reuse_cached_prefix", "cache_full_blocks"):
        method = getattr(bm, name)

        def timed(seq, _method=method):
            start = time.perf_counter()
            try:
                return _method(seq)
            finally:
                total[0] += time.perf_counter() - start
        setattr(bm, name, timed)
    return total


def throughput_at_zero_hits(engines: dict[bool, LLMEngine], args) -> dict:
    vocab = engines[True].model_config.vocab_size
    bookkeeping = time_bookkeeping(engines[True])
    for engine in engines.values():  # warm-up: Numba loads or compiles its kernels
        run_throughput(engine, synthetic_workload(4, (32, 64), (4, 4), vocab, seed=10_000))
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpu_rates: dict[bool, list[float]] = {True: [], False: []}  # tokens per CPU second of this process
    busy, tokens_on, busy_start = [], 0, bookkeeping[0]
    for run in range(args.runs):
        work = synthetic_workload(args.requests, args.input_len, (args.output_len,) * 2, vocab, seed=run)
        for caching in ((True, False) if run % 2 == 0 else (False, True)):
            spent, cpu = bookkeeping[0], time.process_time()
            result = run_throughput(engines[caching], work)
            cpu = time.process_time() - cpu
            rates[caching].append(result["total_tok_s"])
            cpu_rates[caching].append((result["input_tokens"] + result["output_tokens"]) / cpu)
            if caching:
                busy.append((bookkeeping[0] - spent) / result["elapsed_s"])
                tokens_on += result["input_tokens"] + result["output_tokens"]
    stats = engines[True].prefix_cache_stats()
    ratios = [on / off for on, off in zip(rates[True], rates[False])]
    cpu_ratios = [on / off for on, off in zip(cpu_rates[True], cpu_rates[False])]
    return {"tok_s_on": statistics.median(rates[True]), "tok_s_off": statistics.median(rates[False]),
            "tok_s_on_all": rates[True], "tok_s_off_all": rates[False],
            "median_ratio_on_off": statistics.median(ratios), "ratios": ratios,
            "median_cpu_ratio_on_off": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios,
            "bookkeeping_share": statistics.median(busy), "bookkeeping_us_per_token": 1e6 * (bookkeeping[0] - busy_start) / tokens_on,
            "hit_rate": stats.hit_rate, "queries": stats.queries}


def ttft_after_shared_prefix(engines: dict[bool, LLMEngine], args) -> dict:
    rng = np.random.default_rng(args.seed)
    vocab = engines[True].model_config.vocab_size
    system = rng.integers(100, vocab - 100, args.prefix_len).tolist()
    suffixes = [rng.integers(100, vocab - 100, int(n)).tolist() for n in rng.integers(8, 33, args.ttft_requests + 1)]
    out = {}
    for caching, engine in engines.items():
        before = engine.prefix_cache_stats()
        ttfts = [first_token_time(engine, system + suffix) for suffix in suffixes]
        delta = engine.prefix_cache_stats() - before
        out[caching] = {"ttft_ms": [1000 * t for t in ttfts[1:]], "first_ms": 1000 * ttfts[0],
                        "hits": delta.hits, "queries": delta.queries}
    on, off = (statistics.median(out[c]["ttft_ms"]) for c in (True, False))
    return {"prefix_len": args.prefix_len, "median_ttft_ms_on": on, "median_ttft_ms_off": off,
            "speedup": off / on, "detail": {str(k): v for k, v in out.items()}}


def first_token_time(engine: LLMEngine, ids: list[int]) -> float:
    """Seconds from add_request to the first generated token; the request then runs to its end."""
    start = time.perf_counter()
    rid = engine.add_request(None, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=2,
                                                                            ignore_eos=True))
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and first is None:
                first = time.perf_counter() - start
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=5, help="throughput runs per engine (median reported)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=parse_range, default="128:512", help="prompt lengths LO:HI")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=1000, help="shared system prompt for the TTFT part")
    ap.add_argument("--ttft-requests", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    max_len = max(args.prefix_len + 64, args.input_len[1] + args.output_len)
    engines = {caching: make_engine(args.model, caching, max_model_len=max_len)
               for caching in (True, False)}
    zero_hit = throughput_at_zero_hits(engines, args)
    result = {"machine": machine_name(), "threads": f"{numba.get_num_threads()} ({numba.threading_layer()})",
              "zero_hit_throughput": zero_hit,
              "shared_prefix_ttft": ttft_after_shared_prefix(engines, args),
              "load_average_before_after": [load_before, os.getloadavg()[0]]}
    print(json.dumps(result, indent=1) if args.json else report(result, args))


def report(r: dict, args) -> str:
    a, b = r["zero_hit_throughput"], r["shared_prefix_ttft"]
    return "\n".join([
        f"prefix caching on {r['machine']}, Numba threads {r['threads']}, "
        f"load average {r['load_average_before_after'][0]:.2f} -> {r['load_average_before_after'][1]:.2f}",
        f"(a) 0% hits: {args.runs} runs x {args.requests} requests, prompts {args.input_len[0]}-{args.input_len[1]}, "
        f"{args.output_len} out (hit rate {a['hit_rate']:.1%} of {a['queries']} tokens looked up)",
        f"    caching on   {a['tok_s_on']:8.1f} tok/s  (runs {', '.join(f'{x:.0f}' for x in a['tok_s_on_all'])})",
        f"    caching off  {a['tok_s_off']:8.1f} tok/s  (runs {', '.join(f'{x:.0f}' for x in a['tok_s_off_all'])})",
        f"    on/off       {a['median_ratio_on_off']:.4f} median of per-run wall-clock ratios "
        f"({', '.join(f'{x:.3f}' for x in a['ratios'])})",
        f"    on/off       {a['median_cpu_ratio_on_off']:.4f} the same in tokens per CPU second of this process "
        f"({', '.join(f'{x:.3f}' for x in a['cpu_ratios'])})",
        f"    bookkeeping  {100 * a['bookkeeping_share']:.3f}% of the run, {a['bookkeeping_us_per_token']:.3f} us per token "
        f"(hashing, lookups, naming; timed directly)",
        f"(b) TTFT after a shared {b['prefix_len']}-token prompt, median of {args.ttft_requests} requests",
        f"    caching on   {b['median_ttft_ms_on']:8.1f} ms  ({b['detail']['True']['hits']} of "
        f"{b['detail']['True']['queries']} prompt tokens reused, first request {b['detail']['True']['first_ms']:.0f} ms)",
        f"    caching off  {b['median_ttft_ms_off']:8.1f} ms",
        f"    speed-up     {b['speedup']:.1f}x",
    ])


if __name__ == "__main__":
    main()
