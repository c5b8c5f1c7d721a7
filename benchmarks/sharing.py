"""KV blocks saved by sharing: parallel sampling (n samples fork from one prefill) and beam search.

    python benchmarks/sharing.py                       # n = 2, 4, 6 and beam width 2, 4, 6
    python benchmarks/sharing.py --n 4 --width 4 --requests 4 --output-len 16:48

At every step, while the runner computes, it counts the KV blocks in use (distinct blocks held)
against what independent copies would hold (the sum over running sequences of the blocks each one's
table references: a forked sequence holding its own copy of every block it shares). The saving is
1 - sum(in use) / sum(independent) over all steps of a run, as in the vLLM paper (section 6.3: 6.1-9.8%
for parallel sampling and 37.6-55.2% for beam search on Alpaca; 16.2-30.5% and 44.3-66.3% on ShareGPT).

Workload: Alpaca-like instructions (short prompts, through the chat template) with output lengths drawn
uniformly from --output-len (fixed seed, ignore_eos, so every run does the same amount of decoding), or
--synthetic random-token prompts from `cupaged bench`'s workload. Parallel sampling uses temperature 1
with a seed per request; beam search uses best_of = width, n = 1.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cupaged.cli.bench import machine_name, parse_range, synthetic_workload
from cupaged.config import EngineConfig
from cupaged.engine.engine import LLMEngine
from cupaged.sampling_params import SamplingParams

INSTRUCTIONS = [  # short instructions in the style of Alpaca's (written for this benchmark)
    "Give three tips for staying healthy.",
    "What are the three primary colors?",
    "Describe the structure of an atom.",
    "How can we reduce air pollution?",
    "Explain why the sky is blue to a child.",
    "Write a short poem about autumn leaves.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "List five uses for a paper clip.",
    "Translate 'Good morning, how are you?' into French.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery by the sea.",
    "Explain what a prime number is, with an example.",
]


class BlockCounter:
    """Wraps engine.runner.run: before each step's compute, counts blocks in use vs independent copies."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.in_use: list[int] = []
        self.independent: list[int] = []
        self._run = engine.runner.run
        engine.runner.run = self.run

    def run(self, batch):
        tables = [seq.block_table for seq in self.engine.scheduler.running]
        distinct = len({b for table in tables for b in table})
        bm = self.engine.block_manager
        assert distinct == bm.num_blocks - bm.num_free_blocks, "every held block belongs to a running sequence"
        self.in_use.append(distinct)
        self.independent.append(sum(len(table) for table in tables))
        return self._run(batch)

    def reset(self) -> None:
        self.in_use.clear()
        self.independent.clear()

    def saving(self) -> float:
        return 1.0 - sum(self.in_use) / sum(self.independent)


def workload(engine: LLMEngine, args) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)], fixed seed."""
    if args.synthetic:
        return synthetic_workload(args.requests, parse_range(args.input_len), parse_range(args.output_len),
                                  engine.model_config.vocab_size, args.seed)
    rng = np.random.default_rng(args.seed)
    lo, hi = parse_range(args.output_len)
    work = []
    for i in range(args.requests):
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)]}],
                                                    add_generation_prompt=True)
        work.append((engine.tokenizer.encode(text, add_special_tokens=False), int(rng.integers(lo, hi + 1))))
    return work


def run(engine: LLMEngine, counter: BlockCounter, work, make_params) -> dict:
    counter.reset()
    start = time.perf_counter()
    for i, (ids, n_out) in enumerate(work):
        engine.add_request(f"share-{i}", {"prompt_token_ids": ids}, make_params(i, n_out))
    out_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                out_tokens += sum(len(o.token_ids) for o in out.outputs)
    return {"elapsed_s": time.perf_counter() - start, "steps": len(counter.in_use),
            "in_use": float(np.mean(counter.in_use)), "independent": float(np.mean(counter.independent)),
            "saving": counter.saving(), "output_tokens": out_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--output-len", default="32:96", help="output tokens, N or LO:HI")
    ap.add_argument("--synthetic", action="store_true", help="random-token prompts instead of instructions")
    ap.add_argument("--input-len", default="16:64", help="with --synthetic: prompt tokens, N or LO:HI")
    ap.add_argument("--n", type=int, nargs="*", default=[2, 4, 6], help="parallel sampling n values")
    ap.add_argument("--width", type=int, nargs="*", default=[2, 4, 6], help="beam widths")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, backend="cpu", block_size=args.block_size, max_num_seqs=256,
                                    kv_cache_memory=512 * 2**20, max_model_len=1024, progress=False))
    counter = BlockCounter(engine)
    work = workload(engine, args)
    n_in = [len(ids) for ids, _ in work]
    print(f"KV sharing on {machine_name()}, {args.model}, block size {args.block_size}: {len(work)} requests, "
          f"prompts {min(n_in)}-{max(n_in)} tokens (mean {np.mean(n_in):.0f}), outputs {args.output_len}")
    run(engine, counter, work[:1], lambda i, n_out: SamplingParams(temperature=0, max_tokens=2))  # warm-up
    print(f"{'workload':18s} {'steps':>6s} {'blocks in use':>14s} {'independent':>12s} {'saving':>8s} "
          f"{'out tok':>8s} {'time':>8s}")
    rows = [(f"parallel n={n}", lambda i, n_out, n=n: SamplingParams(
        n=n, temperature=1.0, seed=args.seed + i, max_tokens=n_out, ignore_eos=True)) for n in args.n]
    rows += [(f"beam width={k}", lambda i, n_out, k=k: SamplingParams(
        use_beam_search=True, best_of=k, temperature=0, max_tokens=n_out, ignore_eos=True)) for k in args.width]
    for name, make_params in rows:
        r = run(engine, counter, work, make_params)
        print(f"{name:18s} {r['steps']:6d} {r['in_use']:14.1f} {r['independent']:12.1f} {100 * r['saving']:7.1f}% "
              f"{r['output_tokens']:8d} {r['elapsed_s']:7.1f}s", flush=True)


if __name__ == "__main__":
    main()
