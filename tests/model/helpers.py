"""Test helpers: raw logits from our engine, and greedy decoding with transformers."""
from __future__ import annotations

import numpy as np

from cupaged.evaluate import next_logits as engine_logits  # noqa: F401 (the tests' name for it)


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of ids (EOS not special: exactly n tokens), with the
    top-1 vs top-2 logit margin at each step. A plain argmax loop over full forwards, no cache."""
    import torch
    seq, tokens, margins = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            top = torch.topk(model(torch.tensor([seq])).logits[0, -1], 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(tokens[-1])
    return tokens, margins


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


def assert_same_greedy(ours: list[int], theirs: list[int], margins: list[float], tie: float = 1e-3) -> None:
    """Identical tokens; a first difference is only forgiven at a genuine near-tie of the reference."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert margins[step] < tie, (f"greedy tokens differ at step {step}: ours {a}, transformers {b}, "
                                         f"whose top-2 margin is {margins[step]:.2e} (not a near-tie)")
            return
    assert len(ours) == len(theirs)
