"""The quality gates of the CPU's bfloat16 weights against float32 on SmolLM2: the step-0 logits error
is measured; greedy tokens are identical to float32's up to the first step whose float32 top-1
margin is within twice that error (where rounding may honestly flip the argmax); perplexity on a
fixed text is within 1% of float32's."""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.evaluate import PROBE_PROMPTS, PROBE_TEXT, greedy_with_margins, next_logits, perplexity
from cupaged.sampling_params import SamplingParams
from tests.conftest import KV_BYTES

STEPS = 24


@pytest.fixture(scope="module")
def bf16_llm(smollm2_dir):
    from cupaged.llm import LLM
    return LLM(model=str(smollm2_dir), backend="cpu", dtype="bfloat16", kv_cache_memory=KV_BYTES,
               max_model_len=2048, progress=False)


def test_weights_are_held_in_bf16(bf16_llm, smol_llm):
    model = bf16_llm.engine.runner.model
    assert model.embed.dtype == np.uint16 and model.layers[0].gate_up.dtype == np.uint16
    assert model.layers[0].input_norm.dtype == np.float32  # vectors stay float32
    assert model.layers[0].gate_up.nbytes * 2 == smol_llm.engine.runner.model.layers[0].gate_up.nbytes


def test_bf16_greedy_and_perplexity_against_float32(bf16_llm, smol_llm):
    f32, bf16 = smol_llm.engine, bf16_llm.engine
    encode = smol_llm.tokenizer.encode
    prompts = [encode(p, add_special_tokens=False) for p in PROBE_PROMPTS]
    err = max(float(np.abs(next_logits(bf16, ids) - next_logits(f32, ids)).max()) for ids in prompts)
    assert 0 < err < 1.0, f"step-0 logits error {err}"  # bf16 rounding moves logits, not by whole units
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    for ids in prompts:
        want, margins = greedy_with_margins(f32, ids, STEPS)
        got = bf16_llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
        close = next((i for i, m in enumerate(margins) if m < 2 * err), STEPS)
        assert got[:close] == want[:close], (f"bf16 greedy differs before step {close} (step-0 error {err:.3f}): "
                                             f"{got} vs {want}")
    text = encode(PROBE_TEXT, add_special_tokens=False)
    ppl32, ppl16 = perplexity(f32, text), perplexity(bf16, text)
    assert abs(ppl16 / ppl32 - 1) < 0.01, (ppl16, ppl32)
