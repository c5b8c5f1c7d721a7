"""GGUF -> HF conversion: name map, rotary un-permutation, exact dequantization, config."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from cupaged.errors import UnsupportedModelError, WeightsError
from cupaged.weights.convert_gguf import convert_gguf, hf_name, unpermute_rotary
from cupaged.weights.loader import check_weights, open_weights


@pytest.mark.parametrize("n_head,head_dim", [(1, 2), (3, 64), (9, 64), (4, 128), (32, 128)])
@pytest.mark.parametrize("cols", [None, 5])
def test_unpermute_inverts_llama_cpp_permute(kit, n_head, head_dim, cols):
    rng = np.random.default_rng(n_head * 7 + head_dim)
    shape = (n_head * head_dim,) if cols is None else (n_head * head_dim, cols)
    hf = rng.standard_normal(shape).astype(np.float32)
    assert np.array_equal(unpermute_rotary(kit.permute(hf, n_head), n_head), hf)


def test_unpermute_moves_rows_as_expected():
    # One head of dim 4: HF rows [r0 r1 | r2 r3] (halves) are stored interleaved as [r0 r2 r1 r3].
    gguf_rows = np.array([0.0, 2.0, 1.0, 3.0], dtype=np.float32)
    assert unpermute_rotary(gguf_rows, 1).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_name_map_is_literal():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    with pytest.raises(UnsupportedModelError, match="blk.0.ffn_gate_exps.weight"):
        hf_name("blk.0.ffn_gate_exps.weight")
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        hf_name("rope_freqs.weight")


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_round_trip_is_exact(kit, tmp_path, tied):
    tensors = kit.tensors(seed=3, tied=tied)
    q8 = ("model.layers.1.mlp.down_proj.weight",)
    path = kit.write(tmp_path / "tiny.gguf", tensors, q8_names=q8)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    weights = open_weights(out)
    assert set(weights) == set(tensors)
    for name, original in tensors.items():
        expected = original
        if name in q8:
            expected = dequantize(quantize(original, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        assert weights.dtypes[name] == "F32"
        assert np.array_equal(weights[name], expected), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (kit.TINY["n_head"], kit.TINY["n_head_kv"])
    assert config["head_dim"] == kit.TINY["n_embd"] // kit.TINY["n_head"]
    assert config["vocab_size"] == weights["model.embed_tokens.weight"].shape[0]


def test_tiny_tokenizer_files(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tok_config["chat_template"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("<|im_start|> the 42").tokens == ["<|im_start|>", "Ġt", "he", "Ġ", "4", "2"]


def test_unsupported_architecture(kit, tmp_path):
    path = kit.write(tmp_path / "gpt2.gguf", kit.tensors(), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_pre_tokenizer(kit, tmp_path):
    path = kit.write(tmp_path / "x.gguf", kit.tensors(), pre="some-new-model")
    with pytest.raises(UnsupportedModelError, match="some-new-model"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(WeightsError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "out", progress=False)
    with pytest.raises(WeightsError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


def test_real_model_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 8192 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["torch_dtype"] == "float32"


def test_real_model_weights_are_float32_with_llama_shapes(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    kv = config["num_key_value_heads"] * hd
    expected = {"model.embed_tokens.weight": ((config["vocab_size"], d), "F32"), "model.norm.weight": ((d,), "F32")}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": ((config["num_attention_heads"] * hd, d), "F32"),
            p + "self_attn.k_proj.weight": ((kv, d), "F32"), p + "self_attn.v_proj.weight": ((kv, d), "F32"),
            p + "self_attn.o_proj.weight": ((d, d), "F32"),
            p + "mlp.gate_proj.weight": ((ff, d), "F32"), p + "mlp.up_proj.weight": ((ff, d), "F32"),
            p + "mlp.down_proj.weight": ((d, ff), "F32"),
            p + "input_layernorm.weight": ((d,), "F32"), p + "post_attention_layernorm.weight": ((d,), "F32"),
        }
    weights = open_weights(smollm2_dir)
    check_weights(weights, weights.origin, expected)
    norm = np.asarray(weights["model.layers.0.input_layernorm.weight"])
    assert np.isfinite(norm).all() and norm.std() > 0
