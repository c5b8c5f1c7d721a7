"""Where a prefill step's and a decode step's time go, op by op, on the CPU backend.

    python benchmarks/decode_breakdown.py --batch 16 --steps 40 [--dtype bfloat16]
    python benchmarks/decode_breakdown.py --batch 1 --prompt-len 512 --steps 3   # a 512-token prefill

Warms up as `cupaged bench throughput` does (the engine's warm-up request, then the KV blocks the
prompts take written once), submits `batch` synthetic requests (prompts 64-256 tokens, seed 0), times the first step (their prefill, up to max_num_batched_tokens tokens), then
`steps` decode steps, with a timer around every backend op (no profiler overhead beyond that).
"""
from __future__ import annotations

import argparse
import collections
import time

from cupaged.backend.cpu import CpuOps
from cupaged.cli.bench import machine_name, synthetic_workload, warm_up
from cupaged.config import EngineConfig
from cupaged.engine.engine import LLMEngine
from cupaged.sampling_params import SamplingParams

OPS = ("linear", "paged_attention", "write_kv", "silu_and_mul", "fused_add_rms_norm", "rotary_embedding",
       "rms_norm", "embedding")


def instrument(totals: collections.Counter) -> None:
    for name in OPS:
        op = getattr(CpuOps, name)

        def timed(self, *args, _op=op, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _op(self, *args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - start
        setattr(CpuOps, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "q8_0"], help="weights")
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="every prompt this many tokens (default: 64-256 each); e.g. --batch 1 --prompt-len 512")
    args = ap.parse_args()
    totals: collections.Counter = collections.Counter()
    instrument(totals)
    engine = LLMEngine(EngineConfig(model=args.model, backend="cpu", dtype=args.dtype, max_num_seqs=args.batch,
                                    progress=False,
                                    kv_cache_memory=512 * 2**20))
    lengths = (args.prompt_len, args.prompt_len) if args.prompt_len else (64, 256)
    work = synthetic_workload(args.batch, lengths, (args.steps + 2, args.steps + 2), engine.model_config.vocab_size)
    warm_up(engine, work)
    first = min(sum(len(ids) for ids, _ in work), engine.config.max_num_batched_tokens)
    for i, (ids, _) in enumerate(work):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids},
                           SamplingParams(temperature=0, max_tokens=args.steps + 2, ignore_eos=True))
    totals.clear()
    report(f"prefill step of {first} tokens", totals, 1, engine.step)
    engine.step()  # whatever of the prompts the first step left, or one decode
    totals.clear()
    report(f"decode step at batch {args.batch}", totals, args.steps, engine.step)


def report(what: str, totals: collections.Counter, steps: int, step) -> None:
    """Run step() `steps` times; print the mean step time and each op's share of it."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = (time.perf_counter() - start) / steps * 1e3
    print(f"{what} on {machine_name()}: {step_ms:.1f} ms")
    for name, seconds in totals.most_common():
        print(f"  {name:20s} {seconds / steps * 1e3:7.2f} ms")
    print(f"  {'other':20s} {step_ms - sum(totals.values()) / steps * 1e3:7.2f} ms")
    totals.clear()


if __name__ == "__main__":
    main()
