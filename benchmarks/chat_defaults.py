"""Which sampling defaults make `cupaged chat` answer well on the default model: a fixed set of
questions (some with a follow-up turn, answered from the model's own first answer) under each
candidate setting and several seeds; an answer counts as right when it contains an expected word, and
as a runaway when it ends at the token limit instead of at end of turn.

    python benchmarks/chat_defaults.py [-m MODEL] [--seeds 3] [--max-tokens 256]
"""
from __future__ import annotations

import argparse
import statistics

from cupaged.cli.bench import machine_name
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams

# (first turn, its expected answers, follow-up or None, the follow-up's expected answers), lower case;
# an answer is right when it contains any expected answer ("a&b": both a and b)
QUESTIONS = [
    ("What is the capital of France?", ["paris"], "And the capital of Germany?", ["berlin"]),
    ("What is 7 times 8?", ["56"], None, []),
    ("Which planet is closest to the Sun?", ["mercury"], "And the largest planet?", ["jupiter"]),
    ("What gas do plants take in to make food?", ["carbon dioxide", "co2"], None, []),
    ("Who wrote Romeo and Juliet?", ["shakespeare"], None, []),
    ("What is the boiling point of water in Celsius?", ["100"], "And in Fahrenheit?", ["212"]),
    ("How many days are in a week?", ["seven", "7"], None, []),
    ("What is the largest ocean on Earth?", ["pacific"], None, []),
    ("Translate 'thank you' into Spanish.", ["gracias"], None, []),
    ("What is the chemical symbol for gold?", ["au"], None, []),
    ("Name the primary colors of light.", ["red&green&blue"], None, []),
    ("Write one sentence about dogs.", ["dog"], "Now one about cats.", ["cat"]),
]

SETTINGS = {  # name -> SamplingParams fields
    "t0.7 p0.9 (old default)": dict(temperature=0.7, top_p=0.9),
    "t0.7 p0.9 rep1.1": dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
    "t0.2 p0.9 (model card)": dict(temperature=0.2, top_p=0.9),
    "t0.2 p0.9 rep1.1": dict(temperature=0.2, top_p=0.9, repetition_penalty=1.1),
    "t0.2 p0.9 rep1.05": dict(temperature=0.2, top_p=0.9, repetition_penalty=1.05),
    "t0.2 p0.9 freq0.3": dict(temperature=0.2, top_p=0.9, frequency_penalty=0.3),
    "greedy": dict(temperature=0.0),
    "greedy rep1.1": dict(temperature=0.0, repetition_penalty=1.1),
}


def right(text: str, expected: list[str]) -> bool:
    low = text.lower()
    return any(all(part in low for part in item.split("&")) for item in expected)


def run_turn(llm, histories: list[list[dict]], params: list[SamplingParams]):
    outs = llm.generate([llm.chat_prompt(h) for h in histories], params)
    return [o.outputs[0] for o in outs]


def measure(llm, fields: dict, seeds: int, max_tokens: int) -> dict:
    """Right answers, runaways and mean answer tokens over every question, turn and seed."""
    cases = [(q, s) for q in QUESTIONS for s in range(seeds if fields["temperature"] > 0 else 1)]
    params = [SamplingParams(max_tokens=max_tokens, seed=s, **fields) for _, s in cases]
    first = run_turn(llm, [[{"role": "user", "content": q[0]}] for q, _ in cases], params)
    scored = [(right(o.text, q[1]), o) for (q, _), o in zip(cases, first)]
    follow = [(i, q) for i, (q, _) in enumerate(cases) if q[2] is not None]
    histories = [[{"role": "user", "content": q[0]}, {"role": "assistant", "content": first[i].text},
                  {"role": "user", "content": q[2]}] for i, q in follow]
    second = run_turn(llm, histories, [params[i] for i, _ in follow])
    scored += [(right(o.text, q[3]), o) for (_, q), o in zip(follow, second)]
    return {"answers": len(scored), "right": sum(ok for ok, _ in scored),
            "runaway": sum(o.finish_reason == "length" for _, o in scored),
            "mean_tokens": statistics.mean(len(o.token_ids) for _, o in scored)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    args = ap.parse_args()
    llm = LLM(model=args.model, backend="cpu", max_num_seqs=64, progress=False)
    print(f"{args.model} on {machine_name()}: {len(QUESTIONS)} questions, {args.seeds} seeds, "
          f"max {args.max_tokens} tokens; right = an expected word in the answer, runaway = cut at the limit")
    print(f"{'setting':28s} {'right':>9s} {'runaway':>8s} {'mean tokens':>12s}")
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SETTINGS)
    for name, fields in ((n, SETTINGS[n]) for n in only):
        r = measure(llm, fields, args.seeds, args.max_tokens)
        print(f"{name:28s} {r['right']:4d}/{r['answers']:<4d} {r['runaway']:8d} {r['mean_tokens']:12.1f}")


if __name__ == "__main__":
    main()
