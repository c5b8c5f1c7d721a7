"""Parity with Hugging Face transformers (float32, CPU) on SmolLM2-135M-Instruct."""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.sampling_params import SamplingParams
from tests.model.helpers import assert_same_greedy, engine_logits, hf_greedy, hf_logits

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colours: 1."]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime above 10."}]]


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def _ids(smol_llm, prompt):
    return smol_llm.chat_prompt(prompt)["prompt_token_ids"] if isinstance(prompt, list) else \
        smol_llm.tokenizer.encode(prompt)


@pytest.mark.parametrize("prompt", PROMPTS + CHATS, ids=lambda p: str(p)[:24])
def test_step0_logits_match(smol_llm, hf_model, prompt):
    ids = _ids(smol_llm, prompt)
    ours = engine_logits(smol_llm.engine, ids)
    theirs = hf_logits(hf_model, ids)
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS + CHATS, ids=lambda p: str(p)[:24])
def test_greedy_32_tokens_match(smol_llm, hf_model, prompt):
    ids = _ids(smol_llm, prompt)
    theirs, margins = hf_greedy(hf_model, ids, 32)
    out = smol_llm.generate({"prompt_token_ids": ids},
                            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert_same_greedy(out.outputs[0].token_ids, theirs, margins)


def test_chat_template_matches_transformers(smol_llm, smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for chat in CHATS:
        ours = smol_llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        assert ours == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
