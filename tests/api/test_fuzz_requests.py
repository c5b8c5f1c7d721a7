"""Random, often invalid, SamplingParams and prompts thrown into a running batch (hypothesis). Each
either is refused with an InvalidRequestError at the boundary (construction or add_request) or runs
to its end within a bounded number of steps; meanwhile a greedy anchor request in the same batch gives
the tokens it gives alone, and afterwards every KV block is free."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cupaged.errors import InvalidRequestError
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import assert_all_blocks_free, greedy

ANCHOR = {"prompt_token_ids": [10, 200, 3000, 40, 5]}
ODD = st.sampled_from([None, True, False, "1", b"x", [], [1], math.nan, math.inf, -math.inf, -1, 0, 1.5, 2**70,
                       np.int64(2), np.float32(0.5), np.bool_(True)])


VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 60),
    "min_p": st.floats(0, 0.5), "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(0, 2**40),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3), "ignore_eos": st.booleans(),
    "logprobs": st.integers(0, 4), "skip_special_tokens": st.booleans(), "n": st.integers(1, 3),
    "output_kind": st.sampled_from(["cumulative", "delta", "final"]),
}
VALID_PROMPTS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(st.integers(0, 49151), min_size=1, max_size=30),
    st.lists(st.integers(0, 49151), min_size=1, max_size=30).map(lambda ids: {"prompt_token_ids": ids}))
ODD_PROMPTS = st.one_of(ODD, st.lists(st.integers(-5, 50_000), min_size=1, max_size=30),
                        st.lists(st.floats(0, 100), min_size=1, max_size=5),
                        st.dictionaries(st.text(max_size=8), st.integers(), max_size=2))


@st.composite
def request(draw):
    """(SamplingParams kwargs, prompt): all valid, or with one field or the prompt made odd."""
    kw = draw(st.fixed_dictionaries({}, optional=VALID))
    prompt = draw(VALID_PROMPTS)
    spoil = draw(st.sampled_from(["none", "none", "field", "prompt"]))
    if spoil == "field":
        kw[draw(st.sampled_from(sorted(VALID)))] = draw(ODD)
    elif spoil == "prompt":
        prompt = draw(ODD_PROMPTS)
    if draw(st.integers(0, 4)) == 0:  # now and then a beam search
        kw.update(use_beam_search=True, temperature=0, n=2)
        for name in ("top_p", "top_k", "min_p"):
            kw.pop(name, None)
    return kw, prompt, draw(st.integers(1, 5))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request(), min_size=1, max_size=3))
def test_random_requests_never_break_the_batch(smol_llm, requests):
    engine = smol_llm.engine
    reference = smol_llm.generate(ANCHOR, greedy(8))[0].outputs[0].token_ids
    engine.add_request("anchor", ANCHOR, greedy(8))
    engine.step()  # the anchor is running when the others arrive
    admitted = 0
    for i, (kw, prompt, max_tokens) in enumerate(requests):
        try:
            params = SamplingParams(max_tokens=max_tokens, **kw)
            engine.add_request(f"fuzz-{i}", prompt, params)
            admitted += 1
        except InvalidRequestError:
            pass
    event(f"{admitted} of {len(requests)} admitted")
    anchor, steps = None, 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 200, "a request that no step moves"
        for out in engine.step():
            if out.request_id == "anchor" and out.finished:
                anchor = out
    assert anchor is not None and anchor.outputs[0].token_ids == reference
    assert_all_blocks_free(smol_llm)
