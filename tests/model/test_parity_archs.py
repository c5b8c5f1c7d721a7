"""Parity with Hugging Face transformers (float32, CPU) on tiny random models of every architecture.

Llama with GQA and llama3 rope scaling, a tied-embedding Llama with head_dim != hidden / heads,
Mistral with an 8-token sliding window, Qwen2 with random QKV biases and Qwen3 with random Q/K
norms (see tests/model/tiny_models.py). Prompts run past the sliding window, past one KV block
(16 tokens) and past llama3's original context (16 positions); greedy continuations are also
checked with prompts prefilled in chunks of 8 tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from cupaged.llm import LLM
from cupaged.model.config import ModelConfig
from cupaged.sampling_params import SamplingParams
from tests.model.helpers import assert_same_greedy, engine_logits, hf_greedy, hf_logits
from tests.model.tiny_models import SPECS, VOCAB, build_tiny_model

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

KV_BYTES = 64 * 2**20
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
_rng = np.random.default_rng(1234)
# 3 tokens; 12 (past the window of 8); 21 (past a block and llama3's original 16); 45 (three blocks).
PROMPTS = {n: _rng.integers(3, VOCAB, n).tolist() for n in (3, 12, 21, 45)}


@dataclass
class Tiny:
    name: str
    model_dir: object
    hf: object
    llm: LLM
    greedy: dict = field(default_factory=dict)  # prompt length -> transformers' (tokens, margins)

    def hf_greedy(self, n: int) -> tuple[list[int], list[float]]:
        if n not in self.greedy:
            self.greedy[n] = hf_greedy(self.hf, PROMPTS[n], 32)
        return self.greedy[n]


def _load_hf(model_dir, **overrides):
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **overrides).eval()


@pytest.fixture(scope="module", params=list(SPECS))
def tiny(request, tmp_path_factory, smollm2_dir) -> Tiny:
    model_dir = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param), smollm2_dir)
    llm = LLM(model=str(model_dir), backend="cpu", kv_cache_memory=KV_BYTES, progress=False)
    return Tiny(request.param, model_dir, _load_hf(model_dir), llm)


@pytest.fixture(scope="module")
def chunked_llm(tiny) -> LLM:
    """The same model, with at most 8 tokens per step: longer prompts are prefilled in chunks."""
    return LLM(model=str(tiny.model_dir), backend="cpu", kv_cache_memory=KV_BYTES,
               max_num_batched_tokens=8, progress=False)


def test_config_read_as_built(tiny):
    cfg = tiny.llm.engine.model_config
    hf_cfg = tiny.hf.config
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, head_dim)
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.sliding_window == (8 if tiny.name.startswith("mistral") else 0)
    assert cfg.qkv_bias == tiny.name.startswith("qwen2")
    assert cfg.qk_norm == tiny.name.startswith("qwen3")


def test_rope_table_matches_transformers(tiny):
    cfg = ModelConfig.from_dir(tiny.model_dir)
    positions = 256
    ours = cfg.rope_cos_sin(positions)                                  # [P, D]: cos | sin
    x = torch.zeros(1, positions, cfg.head_dim)
    cos, sin = tiny.hf.model.rotary_emb(x, torch.arange(positions)[None])  # [1, P, D], halves repeated
    half = cfg.head_dim // 2
    np.testing.assert_allclose(ours[:, :half], cos[0, :, :half].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[:, half:], sin[0, :, :half].numpy(), atol=1e-4, rtol=0)
    if tiny.name.startswith("llama3"):  # the scaling must really move frequencies
        plain = dataclasses.replace(cfg, rope_scaling={}).rope_cos_sin(positions)
        assert np.abs(plain - ours).max() > 0.5


@pytest.mark.parametrize("n", list(PROMPTS))
def test_step0_logits_match(tiny, n):
    ours = engine_logits(tiny.llm.engine, PROMPTS[n])
    theirs = hf_logits(tiny.hf, PROMPTS[n])
    assert theirs.std() > 0.5, "the reference logits are too flat to tell models apart"
    np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunks-of-8"])
def test_greedy_32_tokens_match(tiny, chunked, request):
    llm = request.getfixturevalue("chunked_llm") if chunked else tiny.llm
    outs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS.values()], GREEDY)
    for n, out in zip(PROMPTS, outs):
        theirs, margins = tiny.hf_greedy(n)
        assert_same_greedy(out.outputs[0].token_ids, theirs, margins)


def test_sliding_window_is_exercised(tiny):
    """transformers' Mistral reference really windows: without the window, long prompts change."""
    if not tiny.name.startswith("mistral"):
        pytest.skip("only the Mistral model has a sliding window")
    full = _load_hf(tiny.model_dir, sliding_window=None)
    short, long = PROMPTS[3], PROMPTS[45]
    np.testing.assert_allclose(hf_logits(full, short), hf_logits(tiny.hf, short), atol=1e-5, rtol=0)
    assert np.abs(hf_logits(full, long) - hf_logits(tiny.hf, long)).max() > 1e-2
