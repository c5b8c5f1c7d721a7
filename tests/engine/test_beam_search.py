"""Beam search (engine/beam.py) against a naive reference, and its blocks.

The reference is vLLM v0's beam search written out by brute force: the log-probabilities of
every live prefix come from a fresh prefill of the whole prefix (`engine_logits`: one sequence,
nothing shared, nothing cached from a previous step), and the candidates are ranked in plain
Python. The engine forks beams that share KV blocks, copies shared blocks on write, and may
compute a request's beams in different steps (a tight token budget, preemption); none of that
may change a hypothesis or its score.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.engine.beam import BeamSearch
from cupaged.engine.sequence import Sequence
from cupaged.errors import InvalidRequestError
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import assert_all_blocks_free
from tests.model.helpers import engine_logits
from tests.model.tiny_models import VOCAB, build_tiny_model

TINY_BLOCK_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # llama3-gqa: 16 tokens x K,V x 2 layers x 2 KV heads x 16 dims, f32


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def beam(**kw) -> SamplingParams:
    return SamplingParams(use_beam_search=True, temperature=0, **kw)


def reference_beam_search(next_logprobs, prompt: list[int], p: SamplingParams, eos: set[int], max_model_len: int,
                          decode=None) -> list[dict]:
    """The best p.n hypotheses of vLLM v0's beam search: [{tokens, cum, score, reason, text}], best first.
    next_logprobs(ids) -> [V] log-probabilities of the token after ids; decode(ids) -> text (for stop strings)."""
    width = p.best_of

    def is_stop_token(t: int) -> bool:
        return (t in eos and not p.ignore_eos) or t in p.stop_token_ids

    def text(out: list[int]) -> str:
        return decode(out[:-1] if is_stop_token(out[-1]) else out) if decode else ""

    def finish_reason(out: list[int]) -> str | None:
        if is_stop_token(out[-1]) or any(s in text(out) for s in p.stop_strings):
            return "stop"
        if len(out) >= p.max_tokens or len(prompt) + len(out) >= max_model_len:
            return "length"
        return None

    def score(h: dict, length: int | None = None) -> float:
        if length is None:
            length = len(prompt) + len(h["tokens"]) - (h["tokens"][-1] in eos)
        return h["cum"] / length ** p.length_penalty

    beams, finished = [{"tokens": [], "cum": 0.0}], []
    while True:
        candidates = []
        for b in beams:
            lp = next_logprobs(prompt + b["tokens"])
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                candidates.append({"tokens": b["tokens"] + [int(t)], "cum": b["cum"] + float(lp[t])})
        candidates = sorted(candidates, key=lambda c: -c["cum"])[:2 * width]
        for c in candidates:
            c["reason"] = finish_reason(c["tokens"])
        finished = sorted(finished + [c for c in candidates if c["reason"]], key=score, reverse=True)[:width]
        running = sorted((c for c in candidates if not c["reason"]), key=score, reverse=True)
        if not running:
            break
        if len(finished) == width:
            best = running[0]
            if p.early_stopping is True:
                break
            if p.early_stopping == "never" and p.length_penalty > 0:
                bound = score(best, min(len(prompt) + p.max_tokens, max_model_len))
            else:
                bound = score(best)
            if score(finished[-1]) >= bound:
                break
        beams = running[:width]
    for h in finished:
        h["score"], h["text"] = score(h), text(h["tokens"])
        for s in p.stop_strings:
            h["text"] = h["text"].split(s)[0]
    return finished[:p.n]


def engine_reference(engine, prompt: list[int], p: SamplingParams) -> list[dict]:
    """The reference over the engine's model: each prefix's log-probs from a fresh prefill of all of it."""
    return reference_beam_search(lambda ids: log_softmax(engine_logits(engine, ids)), prompt, p,
                                 engine.eos_token_ids, engine.max_model_len, engine.tokenizer.decode)


def assert_matches_reference(llm: LLM, prompt: list[int], params: SamplingParams, got=None,
                             check_text: bool = True) -> None:
    got = got if got is not None else llm.generate({"prompt_token_ids": prompt}, params)[0].outputs
    ref = engine_reference(llm.engine, prompt, params)
    assert [o.token_ids for o in got] == [h["tokens"] for h in ref]
    assert [o.finish_reason for o in got] == [h["reason"] for h in ref]
    assert [o.index for o in got] == list(range(len(ref)))
    eos = llm.engine.eos_token_ids
    for o, h in zip(got, ref):
        length = len(prompt) + len(o.token_ids) - (o.token_ids[-1] in eos)
        assert o.cumulative_logprob == pytest.approx(h["cum"], abs=1e-4)
        assert o.cumulative_logprob / length ** params.length_penalty == pytest.approx(h["score"], abs=1e-4)
        if check_text:
            assert o.text == h["text"]
    scores = [h["score"] for h in ref]
    assert scores == sorted(scores, reverse=True)


def assert_no_refs(llm: LLM) -> None:
    assert_all_blocks_free(llm)
    held = [b for b in llm.engine.block_manager.blocks if b.ref_cnt]
    assert not held, f"blocks still referenced: {held}"


# --- the search's rules alone, on a random toy language model ------------------------------------
class NoText:
    """Stands in for a detokenizer where no stop string is used."""

    def fork(self) -> NoText:
        return self


def toy_lm(vocab: int, seed: int):
    """next_logprobs(ids) for a made-up model: each prefix gets its own random distribution over a tiny
    vocabulary in which EOS (token 0) is likely, so hypotheses end early and the length rules matter."""
    def next_logprobs(ids: list[int]) -> np.ndarray:
        rng = np.random.default_rng([seed, *ids])
        logits = rng.normal(0, 2.0, vocab)
        logits[0] += 1.0
        return log_softmax(logits)
    return next_logprobs


def run_search(next_logprobs, prompt: list[int], p: SamplingParams, eos: set[int], max_model_len: int) -> list:
    """engine/beam.py's BeamSearch driven without an engine: every beam gets its row each step."""
    search = BeamSearch(Sequence("toy", prompt, p), NoText(), eos, max_model_len)

    def update_text(seq: Sequence, token: int, detok) -> str | None:
        if (token in eos and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_model_len:
            return "length"
        return None

    while not search.done:
        for b in search.beams:
            search.offer(b, next_logprobs(b.token_ids))
        search.step(update_text)
    return [seq for seq, _ in search.best(p.n)]


@pytest.mark.parametrize("seed", range(40))
def test_search_rules_match_the_reference_on_a_toy_model(seed):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(2, 6))
    p = beam(best_of=width, n=int(rng.integers(1, width + 1)), max_tokens=int(rng.integers(1, 9)),
             length_penalty=float(rng.choice([-0.5, 0.0, 0.5, 1.0, 2.0])),
             early_stopping=[True, False, "never"][seed % 3], ignore_eos=bool(rng.random() < 0.2),
             stop_token_ids=[1] if rng.random() < 0.3 else None)
    vocab, prompt = int(rng.integers(3, 9)), rng.integers(1, 50, int(rng.integers(1, 6))).tolist()
    max_model_len = len(prompt) + int(rng.integers(1, 12))
    lm = toy_lm(vocab, seed)
    got = run_search(lm, prompt, p, {0}, max_model_len)
    ref = reference_beam_search(lm, prompt, p, {0}, max_model_len)
    assert [s.output_token_ids for s in got] == [h["tokens"] for h in ref], p
    assert [s.finish_reason for s in got] == [h["reason"] for h in ref]
    np.testing.assert_allclose([s.cumulative_logprob for s in got], [h["cum"] for h in ref], atol=1e-9)


# --- a tiny random Llama -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    pytest.importorskip("torch", reason="building the tiny model needs torch")
    return build_tiny_model("llama3-gqa", tmp_path_factory.mktemp("tiny-beam"), smollm2_dir)


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(model=str(tiny_dir), backend="cpu", kv_cache_memory=64 * TINY_BLOCK_BYTES, progress=False)


def tiny_prompts(lengths, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


STOPS = list(range(3, 60))  # ~11% of the tiny vocabulary ends a hypothesis: many finish early
CASES = {
    "w2": beam(best_of=2, max_tokens=8),
    "w4-n3-lp0.5-early": beam(best_of=4, n=3, max_tokens=10, length_penalty=0.5, early_stopping=True,
                              stop_token_ids=STOPS),
    "w3-n2-lp1.5-never": beam(best_of=3, n=2, max_tokens=12, length_penalty=1.5, early_stopping="never",
                              stop_token_ids=STOPS),
    "w4-n4-stops-logprobs": beam(best_of=4, n=4, max_tokens=10, stop_token_ids=STOPS, logprobs=2),
    "w3-ignore-eos": beam(best_of=3, n=2, max_tokens=9, ignore_eos=True, length_penalty=0.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_model_matches_the_naive_reference(tiny_llm, name):
    params = CASES[name]
    for prompt in tiny_prompts([5, 20], seed=len(name)):  # a partly filled block, then one past a block
        got = tiny_llm.generate({"prompt_token_ids": prompt}, params)[0].outputs
        assert len(got) == params.n
        assert_matches_reference(tiny_llm, prompt, params, got, check_text=False)
        if params.logprobs is not None:
            for o in got:
                assert len(o.logprobs) == len(o.token_ids)
                assert sum(lp[t] for lp, t in zip(o.logprobs, o.token_ids)) == pytest.approx(
                    o.cumulative_logprob, abs=1e-4)
        assert_no_refs(tiny_llm)


def test_beams_computed_in_different_steps(tiny_dir):
    """A 3-token budget splits a width-4 search's decodes over two steps: the beams ahead wait."""
    llm = LLM(model=str(tiny_dir), backend="cpu", kv_cache_memory=64 * TINY_BLOCK_BYTES,
              max_num_batched_tokens=3, progress=False)
    prompt, params = tiny_prompts([10], seed=5)[0], beam(best_of=4, n=2, max_tokens=8, stop_token_ids=STOPS)
    llm.engine.add_request("lag", {"prompt_token_ids": prompt}, params)
    seen_waiting, outs = False, []
    while llm.engine.has_unfinished_requests():
        outs += llm.engine.step()
        beams = llm.engine.requests["lag"].search.beams if llm.engine.has_unfinished_requests() else []
        seen_waiting |= any(b.num_uncomputed_tokens == 0 for b in beams)
    assert seen_waiting, "some beam should have waited for its siblings"
    assert len(outs) == 1 and outs[0].finished
    assert_matches_reference(llm, prompt, params, outs[0].outputs, check_text=False)
    assert_no_refs(llm)


@pytest.mark.parametrize("lengths, max_tokens", [([30, 35], 40), ([30], 200)], ids=["two-searches", "one-search"])
def test_beam_search_under_preemption(tiny_dir, lengths, max_tokens):
    """16 blocks (the minimum for max_model_len 256). Two width-4 searches of 40 tokens overflow it:
    a preempted beam's siblings wait while the other search goes on. One search of 200 tokens overflows
    it alone: its waiting beams give their blocks up for the lagging one."""
    llm = LLM(model=str(tiny_dir), backend="cpu", kv_cache_memory=16 * TINY_BLOCK_BYTES, progress=False)
    engine = llm.engine
    made_room = []
    make_room = engine.scheduler._make_room
    engine.scheduler._make_room = lambda budget: (made_room.append(1), make_room(budget))
    prompts = tiny_prompts(lengths, seed=6)
    params = beam(best_of=4, n=2, max_tokens=max_tokens, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert engine.scheduler.num_preemptions > 0, "the workload was meant to preempt beams"
    assert bool(made_room) == (len(prompts) == 1)
    for prompt, out in zip(prompts, got):
        assert_matches_reference(llm, prompt, params, out.outputs, check_text=False)
    assert_no_refs(llm)


def test_abort_mid_search_frees_every_block(tiny_llm, tiny_dir):
    engine, bm = tiny_llm.engine, tiny_llm.engine.block_manager
    prompt = tiny_prompts([37], seed=7)[0]
    engine.add_request("b", {"prompt_token_ids": prompt}, beam(best_of=4, max_tokens=30, ignore_eos=True))
    for _ in range(4):
        assert engine.step() == [], "a search has no output until it ends"
    beams = engine.requests["b"].search.beams
    tables = [b for s in beams for b in s.block_table]
    assert len(beams) == 4 and len(set(tables)) < len(tables), "the beams share their prompt blocks"
    assert bm.num_blocks - bm.num_free_blocks == len(set(tables)), "only live beams hold blocks"
    engine.abort("b")
    assert all(s.is_finished and not s.block_table for s in beams)
    assert_no_refs(tiny_llm)
    # mid-search with beams waiting on a sibling (3-token budget)
    lagging = LLM(model=str(tiny_dir), backend="cpu", kv_cache_memory=64 * TINY_BLOCK_BYTES,
                  max_num_batched_tokens=3, progress=False)
    lagging.engine.add_request("b", {"prompt_token_ids": prompt}, beam(best_of=4, max_tokens=30, ignore_eos=True))
    while not any(b.num_uncomputed_tokens == 0 for b in lagging.engine.requests["b"].search.beams[1:]):
        lagging.engine.step()
    lagging.engine.abort("b")
    assert_no_refs(lagging)


# --- SmolLM2 ---------------------------------------------------------------------------------------
def test_smollm2_matches_the_naive_reference(smol_llm):
    tok = smol_llm.tokenizer
    prompt = tok.encode("The capital of France is")
    params = beam(best_of=3, n=2, max_tokens=6)
    got = smol_llm.generate({"prompt_token_ids": prompt}, params)[0].outputs
    assert_matches_reference(smol_llm, prompt, params, got)
    assert {o.finish_reason for o in got} == {"stop", "length"}, "one hypothesis ends in EOS, one runs out"
    stopped = beam(best_of=3, n=3, max_tokens=6, stop=[" France"])  # a hypothesis ends with a stop string
    got = smol_llm.generate({"prompt_token_ids": prompt}, stopped)[0].outputs
    assert_matches_reference(smol_llm, prompt, stopped, got)
    assert any(o.finish_reason == "stop" and o.token_ids[-1] not in smol_llm.engine.eos_token_ids for o in got)
    assert_no_refs(smol_llm)


# --- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(best_of=1), "best_of .*at least 2"),
    (dict(best_of=2, temperature=0.7), "temperature must be 0"),
    (dict(best_of=2, top_p=0.9), "top_p must be 1"),
    (dict(best_of=2, top_k=5), "top_k -1"),
    (dict(best_of=2, min_p=0.1), "min_p 0"),
    (dict(best_of=2, repetition_penalty=1.2), "penalty"),
    (dict(best_of=2, n=3), "best_of must be >= n"),
    (dict(best_of=2, early_stopping="sometimes"), "early_stopping"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_invalid_beam_search_params(kw, match):
    kw = {"temperature": 0, **kw}
    with pytest.raises(InvalidRequestError, match=match) as err:
        SamplingParams(use_beam_search=True, **kw)
    assert "use_beam_search" in str(err.value) or "best_of" in str(err.value)


@pytest.mark.parametrize("kw, match", [(dict(best_of=3, n=2), "best_of must equal n"),
                                       (dict(length_penalty=0.5), "length_penalty"),
                                       (dict(early_stopping=True), "early_stopping")], ids=str)
def test_beam_options_without_beam_search(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kw)


def test_more_beams_than_max_num_seqs(tiny_dir):
    llm = LLM(model=str(tiny_dir), backend="cpu", kv_cache_memory=64 * TINY_BLOCK_BYTES, max_num_seqs=3,
              progress=False)
    with pytest.raises(InvalidRequestError, match="best_of 4 .*max_num_seqs 3"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, beam(best_of=4, max_tokens=3))
    with pytest.raises(InvalidRequestError, match="best_of 4 .*max_num_seqs 3"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(n=4))
    assert_no_refs(llm)
