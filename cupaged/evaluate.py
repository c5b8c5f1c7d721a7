"""Model quality probes on a loaded engine: the logits after a prompt, every token's log-probability
under the model, and perplexity. They check the low-precision weight modes against float32
(tests/model/test_weight_dtypes.py, benchmarks/weight_dtypes.py), as llama.cpp's llama-perplexity does.

They drive the engine's runner directly, one sequence at a time, outside the scheduler: call them on
an engine that is not serving requests.

    >>> from cupaged import LLM                                  # doctest: +SKIP
    >>> llm = LLM(backend="cpu", dtype="bfloat16")
    >>> perplexity(llm.engine, llm.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
"""
from __future__ import annotations

import numpy as np

from cupaged.engine.scheduler import ScheduledBatch
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams

# a fixed probe set: prompts for greedy agreement, a text for perplexity
PROBE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
PROBE_TEXT = ("The river wound slowly through the valley, past fields of wheat and small stone houses. In the "
        "morning the farmers walked down to the water to fill their buckets, and the children followed "
        "them, throwing pebbles and counting the ripples. By noon the sun was high and the air was still; "
        "only the bees moved between the flowers along the bank. When evening came, the light turned gold, "
        "and the families gathered on their porches to talk about the harvest and the weather.")


def next_logits(engine, ids: list[int]) -> np.ndarray:
    """float32 logits [V] for the token after ids, from one prefill through the paged cache."""
    seq = Sequence("logits-probe", ids, SamplingParams(max_tokens=1))
    engine.block_manager.append_slots(seq, len(ids))
    try:
        return _logits(engine, ScheduledBatch([seq], [len(ids)]))
    finally:
        engine.block_manager.free(seq)


def token_logprobs(engine, ids: list[int]) -> np.ndarray:
    """[len(ids) - 1] float64: log p(ids[t] | ids[:t]) for t >= 1, one token per step (a decode each)."""
    if len(ids) < 2:
        raise ValueError("token_logprobs needs at least 2 tokens")
    seq = Sequence("logprob-probe", ids[:1], SamplingParams(max_tokens=len(ids)))
    out = np.empty(len(ids) - 1)
    try:
        for t in range(1, len(ids)):
            engine.block_manager.append_slots(seq, 1)
            logits = _logits(engine, ScheduledBatch([seq], [1])).astype(np.float64)
            top = logits.max()
            out[t - 1] = logits[ids[t]] - top - np.log(np.exp(logits - top).sum())
            seq.num_computed_tokens += 1
            seq.token_ids.append(ids[t])
    finally:
        engine.block_manager.free(seq)
    return out


def greedy_with_margins(engine, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after ids (one prefill each, no sampler) with the top-1 vs top-2 logit margin at
    each step: where the margin is small, another precision may honestly pick the other token."""
    seq, tokens, margins = list(ids), [], []
    for _ in range(steps):
        logits = next_logits(engine, seq)
        top2 = np.sort(logits)[-2:]
        tokens.append(int(np.argmax(logits)))
        margins.append(float(top2[1] - top2[0]))
        seq.append(tokens[-1])
    return tokens, margins


def perplexity(engine, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given what precedes each."""
    return float(np.exp(-token_logprobs(engine, ids).mean()))


def _logits(engine, batch: ScheduledBatch) -> np.ndarray:
    return np.asarray(engine.ops.to_numpy(engine.runner.run(batch)), dtype=np.float32)[0]
