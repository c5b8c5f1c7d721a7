"""The quality gates of the CPU's bfloat16 and q8_0 weights against float32 on SmolLM2: the step-0
logits error is measured; greedy tokens are identical to float32's up to the first step whose
float32 top-1 margin is within twice that error (where rounding may honestly flip the argmax);
perplexity on a fixed text is within 1% (bf16) / 2% (q8_0) of float32's."""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.evaluate import PROBE_PROMPTS, PROBE_TEXT, greedy_with_margins, next_logits, perplexity
from cupaged.sampling_params import SamplingParams
from tests.conftest import KV_BYTES

STEPS = 24


GATES = {"bfloat16": 0.01, "q8_0": 0.02}  # perplexity within this share of float32's


@pytest.fixture(scope="module", params=list(GATES))
def low_llm(request, smollm2_dir):
    from cupaged.llm import LLM
    return LLM(model=str(smollm2_dir), backend="cpu", dtype=request.param, kv_cache_memory=KV_BYTES,
               max_model_len=2048, progress=False)


def test_weights_are_held_in_their_dtype(low_llm, smol_llm):
    model, full = low_llm.engine.runner.model, smol_llm.engine.runner.model.layers[0].gate_up
    want = {"bfloat16": np.uint16, "q8_0": np.int8}[low_llm.engine.ops.weight_dtype]
    assert model.embed.dtype == want and model.layers[0].gate_up.dtype == want
    assert model.layers[0].input_norm.dtype == np.float32  # vectors stay float32
    per_weight = {"bfloat16": 2, "q8_0": 1 + 4 / 32}[low_llm.engine.ops.weight_dtype]
    assert model.layers[0].gate_up.nbytes == full.nbytes / 4 * per_weight


def test_greedy_and_perplexity_against_float32(low_llm, smol_llm):
    f32, low = smol_llm.engine, low_llm.engine
    encode = smol_llm.tokenizer.encode
    prompts = [encode(p, add_special_tokens=False) for p in PROBE_PROMPTS]
    err = max(float(np.abs(next_logits(low, ids) - next_logits(f32, ids)).max()) for ids in prompts)
    assert 0 < err < 1.0, f"step-0 logits error {err}"  # rounding moves logits, not by whole units
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    for ids in prompts:
        want, margins = greedy_with_margins(f32, ids, STEPS)
        got = low_llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
        close = next((i for i, m in enumerate(margins) if m < 2 * err), STEPS)
        assert got[:close] == want[:close], (f"{low.ops.weight_dtype} greedy differs before step {close} (step-0 error {err:.3f}): "
                                             f"{got} vs {want}")
    text = encode(PROBE_TEXT, add_special_tokens=False)
    ppl32, ppl_low = perplexity(f32, text), perplexity(low, text)
    assert abs(ppl_low / ppl32 - 1) < GATES[low.ops.weight_dtype], (ppl_low, ppl32)
