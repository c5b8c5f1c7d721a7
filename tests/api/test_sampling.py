"""Sampling: seeds, the greedy limits of each filter, penalties and the sampled distribution against
NumPy references of vLLM's definitions, log-probabilities against the model's raw logits, and the
stop conditions (stop strings across token boundaries, stop token ids, EOS, max_tokens)."""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.engine.sampler import Sampler
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import assert_same_or_tie, greedy
from tests.model.helpers import engine_logits

PROMPT = "The capital of France is"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


# --- seeds ----------------------------------------------------------------------------------------
def test_seed_reproduces_alone_and_in_a_batch(smol_llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    alone = smol_llm.generate(PROMPT, seeded)[0].outputs[0].token_ids
    assert smol_llm.generate(PROMPT, seeded)[0].outputs[0].token_ids == alone
    batch = smol_llm.generate(
        ["Once upon a time", PROMPT, "def main():", PROMPT],
        [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True),  # unseeded: draws from the engine rng
         seeded, SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True), greedy(8)])
    assert batch[1].outputs[0].token_ids == alone, "a seeded request must not depend on its batch"
    # A batch mate that needs the host path (log-probabilities, a penalty) must not move it off its own.
    mixed = smol_llm.generate(
        [PROMPT, "Once upon a time", PROMPT],
        [seeded, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, logprobs=2),
         SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=5, max_tokens=8, ignore_eos=True)])
    assert mixed[0].outputs[0].token_ids == alone, "a host-path batch mate changed a seeded request"
    assert mixed[1].outputs[0].logprobs is not None and len(mixed[1].outputs[0].logprobs) == 8
    penalized = smol_llm.generate(PROMPT, SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=5,
                                                         max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == penalized


def test_different_seeds_differ(smol_llm):
    outs = smol_llm.generate([PROMPT] * 3, [SamplingParams(temperature=1.5, seed=s, max_tokens=8, ignore_eos=True)
                                            for s in (1, 2, 3)])
    ids = [tuple(o.outputs[0].token_ids) for o in outs]
    assert len(set(ids)) == 3, f"three seeds at temperature 1.5 gave {ids}"


# --- filters in their greedy limit ----------------------------------------------------------------
def test_greedy_limits_of_every_filter(smol_llm):
    ref = smol_llm.generate(PROMPT, greedy(8, logprobs=1))[0].outputs[0]
    for step, (token, lp) in enumerate(zip(ref.token_ids, ref.logprobs)):  # temperature 0 is the argmax
        assert lp[token] == max(lp.values()), f"greedy token {step} is not the top-1 log-prob"
    first = engine_logits(smol_llm.engine, smol_llm.tokenizer.encode(PROMPT))
    assert ref.token_ids[0] == int(np.argmax(first))
    limits = {"top_k=1": dict(top_k=1), "top_p=1e-6": dict(top_p=1e-6), "min_p=0.9999": dict(min_p=0.9999)}
    outs = smol_llm.generate([PROMPT] * len(limits), [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True,
                                                                    **kw) for kw in limits.values()])
    for name, out in zip(limits, outs):
        assert_same_or_tie(out.outputs[0].token_ids, ref.token_ids, ref.logprobs, f"temperature 1 with {name}")


# --- penalties: Sampler against a NumPy reference of vLLM's definitions ---------------------------
def reference_penalties(logits: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams) -> np.ndarray:
    """vLLM: repetition penalty on tokens of prompt or output (divide positive logits, multiply the
    others), then subtract frequency_penalty * count and presence_penalty * [count > 0] over the output."""
    out = logits.astype(np.float64).copy()
    seen = np.zeros(out.size, bool)
    seen[prompt + output] = True
    penalty = np.where(seen, p.repetition_penalty, 1.0)
    out = np.where(out > 0, out / penalty, out * penalty)
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=out.size)
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def fake_seq(prompt: list[int], output: list[int], params: SamplingParams) -> Sequence:
    seq = Sequence("fake", prompt, params)
    for t in output:
        seq.append_token(t)
    return seq


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7),
                                dict(presence_penalty=1.5), dict(frequency_penalty=0.6),
                                dict(frequency_penalty=-0.5, presence_penalty=0.4),
                                dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.9)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_penalties_match_reference(kw):
    rng = np.random.default_rng(len(str(kw)))
    vocab, rows = 16, 200
    logits = rng.normal(0, 1.5, size=(rows, vocab)).astype(np.float32)
    params = SamplingParams(temperature=0, **kw)
    seqs, expected = [], []
    for row in range(rows):
        prompt = rng.integers(0, vocab, size=int(rng.integers(1, 8))).tolist()
        output = rng.integers(0, vocab, size=int(rng.integers(0, 12))).tolist()
        seqs.append(fake_seq(prompt, output, params))
        expected.append(reference_penalties(logits[row], prompt, output, params))
    tokens, _ = Sampler(0).sample(logits, seqs)
    expected = np.array(expected)
    assert tokens == np.argmax(expected, axis=1).tolist()
    changed = np.argmax(expected, axis=1) != np.argmax(logits, axis=1)
    assert changed.sum() >= 10, "the random cases should exercise the penalty (argmax moves)"
    # And the penalised row itself, which sampling draws from.
    for row in range(5):
        penalised = logits[row].copy()
        Sampler._apply_penalties(penalised, seqs[row])
        np.testing.assert_allclose(penalised, expected[row], rtol=1e-6, atol=1e-6)


def test_penalties_shape_the_sampled_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.3)
    seq = fake_seq([3], [0, 0, 2], params)
    target = softmax(reference_penalties(logits, [3], [0, 0, 2], params))
    freq = empirical(logits, params, seq=seq)
    assert chi_square(freq, target) < CHI2_CRIT


# --- the sampled distribution ---------------------------------------------------------------------
N_DRAWS = 20_000
CHI2_CRIT = 25.0  # chi-square, 4 degrees of freedom: P(X > 25) ~ 5e-5


def empirical(logits: np.ndarray, params: SamplingParams, seq: Sequence | None = None) -> np.ndarray:
    seq = seq or fake_seq([0], [], params)
    tokens, _ = Sampler(seed=7).sample(np.tile(logits, (N_DRAWS, 1)), [seq] * N_DRAWS)
    return np.bincount(tokens, minlength=logits.size) / N_DRAWS


def chi_square(freq: np.ndarray, target: np.ndarray) -> float:
    keep = target > 0
    assert freq[~keep].sum() == 0, f"tokens with probability 0 were drawn: {freq}"
    obs, exp = freq[keep] * N_DRAWS, target[keep] * N_DRAWS
    return float(((obs - exp) ** 2 / exp).sum())


LOGITS5 = np.array([1.0, 0.8, 0.5, -1.0, 0.0], np.float32)  # softmax ~ [.34, .28, .21, .05, .13]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_softmax(temperature):
    freq = empirical(LOGITS5, SamplingParams(temperature=temperature))
    assert chi_square(freq, softmax(LOGITS5 / temperature)) < CHI2_CRIT


@pytest.mark.parametrize("kw", [dict(top_k=2), dict(top_p=0.5), dict(min_p=0.7)])
def test_filters_keep_only_allowed_tokens(kw):
    # top_k=2, top_p=0.5 (token 1 starts below 0.5 cumulative, token 2 above) and min_p=0.7
    # (p >= 0.7 * 0.34) all keep tokens {0, 1}, renormalised.
    p = softmax(LOGITS5)
    target = np.where(np.arange(5) < 2, p, 0.0)
    target /= target.sum()
    freq = empirical(LOGITS5, SamplingParams(temperature=1.0, **kw))
    assert set(np.flatnonzero(freq)) == {0, 1}
    assert chi_square(freq, target) < CHI2_CRIT


# --- logprobs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [greedy(3, logprobs=3),
                                    SamplingParams(temperature=0.8, seed=3, max_tokens=3, logprobs=4)],
                         ids=["greedy", "sampled"])
def test_logprobs_are_log_softmax_of_raw_logits(smol_llm, params):
    prompt = smol_llm.tokenizer.encode(PROMPT)
    out = smol_llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 3
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        ref = log_softmax(engine_logits(smol_llm.engine, prompt + out.token_ids[:step]))
        top = np.argsort(-ref)[:params.logprobs]
        assert token in entry and len(entry) in (params.logprobs, params.logprobs + 1)
        assert set(entry) >= {int(t) for t in top[:params.logprobs - 1]}  # the last may be a near-tie swap
        for t, v in entry.items():
            assert v == pytest.approx(ref[t], abs=2e-3), f"log-prob of token {t} at step {step}"
        np.testing.assert_allclose(sorted(v for t, v in entry.items() if t != token or token in top)[::-1],
                                   ref[top], atol=2e-3)


# --- stop conditions ------------------------------------------------------------------------------
def test_stop_string_across_token_boundary(smol_llm):
    tok = smol_llm.tokenizer
    base = smol_llm.generate(PROMPT, greedy(16))[0].outputs[0]
    text, ids = base.text, base.token_ids
    # Where each token's text ends (byte-level BPE on ASCII: decodes of prefixes are prefixes).
    ends = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
    stop = cut = k = None
    for k in range(1, len(ids)):
        boundary = ends[k - 1]
        if boundary - (ends[k - 2] if k > 1 else 0) >= 2 and ends[k] - boundary >= 2:
            candidate = text[boundary - 2:boundary + 2]  # tail of token k-1 + head of token k
            if text.find(candidate) == boundary - 2 and candidate.strip():
                stop, cut = candidate, boundary - 2
                break
    assert stop is not None, f"no usable token boundary in {text!r}"
    out = smol_llm.generate(PROMPT, greedy(16, stop=[stop, "never-seen-stop"]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:cut], f"stop {stop!r}: {out.text!r}"
    assert out.token_ids == ids[:k + 1], "generation ends at the token that completes the stop string"
    deltas = list(smol_llm.stream(PROMPT, greedy(16, stop=stop)))
    assert "".join(deltas) == text[:cut] and not any(stop in d for d in deltas)


def test_stop_token_ids(smol_llm):
    base = smol_llm.generate(PROMPT, greedy(10))[0].outputs[0].token_ids
    k = next(i for i in range(2, len(base)) if base[i] not in base[:i])
    out = smol_llm.generate(PROMPT, greedy(10, stop_token_ids=[base[k]]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base[:k + 1]
    assert out.text == smol_llm.tokenizer.decode(base[:k]), "as in vLLM, the stop token's text is not returned"


def test_max_tokens(smol_llm):
    outs = smol_llm.generate([PROMPT] * 3, [greedy(n) for n in (1, 2, 5)])
    for n, out in zip((1, 2, 5), outs):
        assert len(out.outputs[0].token_ids) == n and out.outputs[0].finish_reason == "length"
    assert outs[2].outputs[0].token_ids[:2] == outs[1].outputs[0].token_ids


def test_seeded_uniforms_are_one_draw_per_step_of_the_sequences_own_generator():
    """The fast path's uniforms for a seeded sequence, drawn ahead in blocks, against one scalar draw
    per step from the generator its seed names; forgetting the sequence starts it over."""
    sampler = Sampler(0)
    seqs = [Sequence("r", [1, 2], SamplingParams(temperature=0.8, seed=seed), index=i)
            for seed, i in ((3, 0), (3, 1), (11, 0))]
    steps = 2 * Sampler.AHEAD + 5
    got = [[sampler._next_uniform(seq) for seq in seqs] for _ in range(steps)]
    for j, seq in enumerate(seqs):
        own = np.random.default_rng([seq.params.seed, seq.index])
        assert [row[j] for row in got] == [float(own.random(dtype=np.float32)) for _ in range(steps)]
    sampler.forget(seqs[0])
    assert sampler._next_uniform(seqs[0]) == float(np.random.default_rng([3, 0]).random(dtype=np.float32))
