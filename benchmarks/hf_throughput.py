"""The `cupaged bench throughput` workload through transformers' `generate`, on the same machine.

    python benchmarks/hf_throughput.py -n 16 --concurrency 16    # prints transformers, cupaged and the ratio

Both sides run float32 on the CPU with the same fixed-seed prompts and output lengths
(ignore_eos). transformers gets `concurrency` requests per `generate` call, left-padded; each
call runs to the longest output of its batch and only the requested tokens are counted, which
is how a static-batching engine serves such a workload. Token times come from a streamer
that generate() calls once per step, so time to first token includes the batch's prefill.
"""
from __future__ import annotations

import argparse
import json
import time


class StepClock:
    """A generate() streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:  # the first put() is the prompt itself
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run_hf(model_dir: str, work, concurrency: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from cupaged.cli.bench import summarize
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generate(torch.tensor([work[0][0]]), max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    stamps = []
    for i in range(0, len(work), concurrency):
        chunk = work[i:i + concurrency]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        n_new = max(n for _, n in chunk)
        clock = StepClock()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=0, streamer=clock)
        stamps += [clock.times[:n] for _, n in chunk]
    return summarize(work, stamps, start, time.perf_counter() - start)


def run_cupaged(model_dir: str, work, concurrency: int) -> dict:
    from cupaged.cli.bench import run_throughput
    from cupaged.config import EngineConfig
    from cupaged.engine.engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=model_dir, backend="cpu", max_num_seqs=concurrency, progress=False))
    run_throughput(engine, work[:1])  # warm-up
    return run_throughput(engine, work)


def main() -> None:
    from cupaged.cli.bench import machine_name, parse_range, print_result, synthetic_workload
    from cupaged.weights.store import resolve_model
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("-n", "--num-requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--input-len", default="64:256")
    ap.add_argument("--output-len", default="64:128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model_dir = str(resolve_model(args.model))
    import json as _json
    vocab = _json.load(open(f"{model_dir}/config.json"))["vocab_size"]
    work = synthetic_workload(args.num_requests, parse_range(args.input_len), parse_range(args.output_len),
                              vocab, args.seed)
    hf = run_hf(model_dir, work, args.concurrency)
    ours = run_cupaged(model_dir, work, args.concurrency)
    ratio = ours["output_tok_s"] / hf["output_tok_s"]
    if args.json:
        print(json.dumps({"machine": machine_name(), "transformers": hf, "cupaged": ours, "ratio": ratio}))
        return
    print_result(f"transformers (concurrency {args.concurrency})", hf, False)
    print_result(f"cupaged cpu (concurrency {args.concurrency})", ours, False)
    print(f"cupaged / transformers output tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
