"""Quality and size of the CPU's weight dtypes against float32, on the default model (or -m): the
step-0 logits error over a few prompts, how many greedy tokens agree with float32's (and the first
step whose float32 top-1 margin is within twice that error), perplexity on a fixed text, and the
bytes of weights held.

    python benchmarks/weight_dtypes.py [-m MODEL]
"""
from __future__ import annotations

import argparse

import numpy as np

from cupaged.cli.bench import machine_name
from cupaged.evaluate import PROBE_PROMPTS, PROBE_TEXT, greedy_with_margins, next_logits, perplexity
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams

STEPS = 24


def weight_bytes(model) -> int:
    """Bytes of every weight the model holds (a tied head counted once)."""
    arrays = [model.embed, model.norm] + ([] if model.lm_head is model.embed else [model.lm_head])
    arrays += [a for layer in model.layers for a in vars(layer).values() if a is not None]
    return sum(a.nbytes for a in arrays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    args = ap.parse_args()
    kw = dict(backend="cpu", kv_cache_memory=256 << 20, max_model_len=2048, progress=False)
    ref = LLM(model=args.model, **kw) if args.model else LLM(**kw)
    encode = ref.tokenizer.encode
    prompts = [encode(p, add_special_tokens=False) for p in PROBE_PROMPTS]
    text = encode(PROBE_TEXT, add_special_tokens=False)
    greedy = [greedy_with_margins(ref.engine, ids, STEPS) for ids in prompts]
    ppl_ref = perplexity(ref.engine, text)
    print(f"{machine_name()}; {ref.engine.config.model}; {len(prompts)} prompts, {STEPS} greedy steps, "
          f"perplexity over {len(text)} tokens")
    print(f"{'weights':10} {'MiB':>7} {'step-0 max|dlogit|':>19} {'greedy same':>12} {'first close step':>17} "
          f"{'perplexity':>11} {'vs float32':>10}")
    print(f"{'float32':10} {weight_bytes(ref.engine.runner.model) / 2**20:7.1f} {'-':>19} {'-':>12} {'-':>17} "
          f"{ppl_ref:11.3f} {'':>10}")
    for dtype in ("bfloat16", "q8_0"):
        llm = LLM(model=args.model, dtype=dtype, **kw) if args.model else LLM(dtype=dtype, **kw)
        err = max(float(np.abs(next_logits(llm.engine, ids) - next_logits(ref.engine, ids)).max()) for ids in prompts)
        same, close = 0, []
        params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
        for ids, (want, margins) in zip(prompts, greedy):
            got = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
            same += next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), STEPS)
            close.append(next((i for i, m in enumerate(margins) if m < 2 * err), STEPS))
        ppl = perplexity(llm.engine, text)
        print(f"{dtype:10} {weight_bytes(llm.engine.runner.model) / 2**20:7.1f} {err:19.4f} "
              f"{same:>5}/{STEPS * len(prompts):<6} {min(close):>17} {ppl:11.3f} {100 * (ppl / ppl_ref - 1):+9.2f}%")


if __name__ == "__main__":
    main()
