"""Fixtures for the weights tests: the real default model, and tiny GGUF files made here."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from cupaged.weights.catalog import DEFAULT_MODEL
from cupaged.weights.store import resolve_model

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = {"n_layer": 2, "n_embd": 16, "n_ff": 32, "n_head": 4, "n_head_kv": 2, "n_ctx": 64}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, converted once per machine into the normal cache ($CUPAGED_HOME or ~/.cache/cupaged)."""
    return resolve_model(DEFAULT_MODEL, progress=False)


@pytest.fixture
def tmp_home(tmp_path, monkeypatch) -> Path:
    """A private, empty CUPAGED_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("CUPAGED_HOME", str(home))
    return home


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rotary permutation (HF -> GGUF), written independently here."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_tensors(seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Random HF-named float32 tensors of a tiny Llama."""
    rng = np.random.default_rng(seed)
    d, ff, hd = TINY["n_embd"], TINY["n_ff"], TINY["n_embd"] // TINY["n_head"]
    vocab = len(SPECIALS) + 256 + 2
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(TINY["n_layer"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (TINY["n_head_kv"] * hd, d),
            p + "self_attn.v_proj.weight": (TINY["n_head_kv"] * hd, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _gguf_name(hf: str) -> str:
    """HF name -> llama.cpp name, for the tiny writer."""
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def _write_tokenizer(writer: gguf.GGUFWriter, pre: str) -> None:
    """A byte-level BPE vocabulary: 3 specials, 256 bytes, 2 merges."""
    tokens = SPECIALS + byte_alphabet() + ["Ġt", "he"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_tiny_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", pre: str = "smollm",
                    q8_names: tuple[str, ...] = ()) -> Path:
    """Write HF tensors as a llama.cpp GGUF (Q/K permuted; names in q8_names stored as Q8_0)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["n_layer"])
    writer.add_context_length(TINY["n_ctx"])
    writer.add_embedding_length(TINY["n_embd"])
    writer.add_feed_forward_length(TINY["n_ff"])
    writer.add_head_count(TINY["n_head"])
    writer.add_head_count_kv(TINY["n_head_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    _write_tokenizer(writer, pre)
    for name, array in tensors.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, TINY["n_head"])
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, TINY["n_head_kv"])
        array = np.ascontiguousarray(array)
        if name in q8_names:
            q8 = quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(name), q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class TinyKit:
    """The helpers above, handed to tests as the `kit` fixture (test modules cannot import conftest)."""

    TINY = TINY
    SPECIALS = SPECIALS
    permute = staticmethod(llama_cpp_permute)
    tensors = staticmethod(tiny_hf_tensors)
    write = staticmethod(write_tiny_gguf)


@pytest.fixture
def kit() -> type[TinyKit]:
    """Tiny-GGUF helpers: kit.tensors(), kit.write(path, tensors, ...), kit.permute(w, n_head)."""
    return TinyKit


@pytest.fixture
def tiny_gguf(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny tied-embedding Llama GGUF and the HF tensors it was made from."""
    tensors = tiny_hf_tensors()
    return write_tiny_gguf(tmp_path / "tiny.gguf", tensors), tensors
