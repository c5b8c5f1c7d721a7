"""A request that fails inside a step ends alone: finish_reason "error" with the message on its last
output, its blocks freed, and every other request in the batch gives the tokens it gives alone.
The failures are injected where a request's own work runs (its sampling row, its detokenizer, its
beam search step), since the boundary checks now refuse the values that used to get there."""
from __future__ import annotations

import pytest

from cupaged.engine.beam import BeamSearch
from cupaged.engine.sampler import Sampler
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import assert_all_blocks_free, greedy, random_prompts

BAD_SEED = 4242


def solo(llm, prompts, params):
    return [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]


@pytest.fixture
def broken_host_sampling(monkeypatch):
    """Host sampling raises for the rows of the request seeded BAD_SEED (its logprobs put it there)."""
    real = Sampler.sample_on_host

    def sample_on_host(self, logits, seqs):
        if any(seq.params.seed == BAD_SEED for seq in seqs):
            raise FloatingPointError("injected: this row's sampling failed")
        return real(self, logits, seqs)

    monkeypatch.setattr(Sampler, "sample_on_host", sample_on_host)


def test_a_failing_sampling_row_fails_its_request_alone(smol_llm, broken_host_sampling):
    prompts = random_prompts([9, 17, 30], seed=5)
    alone = solo(smol_llm, prompts, greedy(6))
    bad = SamplingParams(temperature=0.8, seed=BAD_SEED, logprobs=1, max_tokens=6)
    outs = smol_llm.generate(prompts[:2] + [prompts[0]] + prompts[2:], [greedy(6)] * 2 + [bad, greedy(6)])
    failed = outs[2]
    assert failed.outputs[0].finish_reason == "error" and failed.finished
    assert "injected" in failed.error and failed.request_id in failed.error
    assert [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 2] == alone
    assert_all_blocks_free(smol_llm)


def test_a_failing_detokenizer_fails_its_request_alone(smol_llm):
    prompts = random_prompts([12, 20], seed=6)
    alone = solo(smol_llm, prompts, greedy(5))
    engine = smol_llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"iso-{i}", p, greedy(5))
    engine.add_request("iso-bad", prompts[0], greedy(5))

    class Broken:
        def add(self, token):
            raise UnicodeError("injected: this request's text failed")

    engine.outputs.states["iso-bad"].outputs[0].detok = Broken()
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():  # requests without a queue: the failure comes back from step()
            if out.finished:
                finished[out.request_id] = out
    assert finished["iso-bad"].outputs[0].finish_reason == "error" and "injected" in finished["iso-bad"].error
    assert [finished[f"iso-{i}"].outputs[0].token_ids for i in range(2)] == alone
    assert_all_blocks_free(smol_llm)


def test_a_failing_beam_search_fails_alone(smol_llm, monkeypatch):
    prompts = random_prompts([10, 14], seed=7)
    alone = solo(smol_llm, prompts, greedy(4))
    real = BeamSearch.step

    def step(self, *args, **kwargs):
        if len(self.beams) == 3:
            raise ZeroDivisionError("injected: a beam score")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BeamSearch, "step", step)
    beam = SamplingParams(use_beam_search=True, n=3, temperature=0, max_tokens=4)
    outs = smol_llm.generate([prompts[0], prompts[0], prompts[1]], [greedy(4), beam, greedy(4)])
    assert {o.finish_reason for o in outs[1].outputs} == {"error"} and "injected" in outs[1].error
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    assert_all_blocks_free(smol_llm)


def test_a_stream_sees_its_request_fail(smol_llm, broken_host_sampling):
    bad = SamplingParams(temperature=0.8, seed=BAD_SEED, logprobs=1, max_tokens=6)
    outs = list(smol_llm.stream_outputs({"prompt_token_ids": [5, 6, 7]}, bad))
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error"
    assert_all_blocks_free(smol_llm)
    after = smol_llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy(3))[0].outputs[0]
    assert len(after.token_ids) == 3 and after.finish_reason == "length"
