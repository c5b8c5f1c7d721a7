"""Convert a llama-architecture GGUF file into an HF-layout model directory.

Every tensor is dequantized with ``gguf.quants.dequantize`` (Q4_1, Q8_0, F16,
K-quants...) to float32 and stored as float32 safetensors, so the values are
exactly the ones llama.cpp computes with. Names go through an explicit,
literal map (llama.cpp name -> HF name).

llama.cpp stores the rows of the Q and K projections permuted for its rotary
layout. ``convert_hf_to_gguf.py`` does, per head group of ``n`` heads::

    gguf = hf.reshape(n, 2, rows // n // 2, ...).swapaxes(1, 2).reshape(hf.shape)

so we undo it with the inverse (the two middle axes in the other order)::

    hf = gguf.reshape(n, rows // n // 2, 2, ...).swapaxes(1, 2).reshape(gguf.shape)

with ``n = n_head`` for Q and ``n = n_head_kv`` for K (biases too).

Output: config.json, generation_config.json, model.safetensors (or shards
plus model.safetensors.index.json), tokenizer.json, tokenizer_config.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from cupaged.errors import UnsupportedModelError, WeightsError
from cupaged.weights.gguf_tokenizer import build_tokenizer, tokenizer_config

if TYPE_CHECKING:  # gguf is imported where it is used: a machine that only loads converted weights needs none
    from gguf import GGUFReader

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
SHARD_BYTES = 2 << 30  # float32 bytes per safetensors shard

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Rotary-permuted tensors -> which head count undoes the permutation.
PERMUTED = {
    "attn_q.weight": "n_head", "attn_q.bias": "n_head",
    "attn_k.weight": "n_head_kv", "attn_k.bias": "n_head_kv",
}


def hf_name(gguf_name: str) -> str:
    """The HF name of a llama.cpp tensor name; UnsupportedModelError if unknown."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    if gguf_name == "rope_freqs.weight":
        raise UnsupportedModelError(
            "GGUF tensor 'rope_freqs.weight' (Llama 3 rope scaling) cannot be converted; "
            "use the original HF repository with `cupaged pull`"
        )
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no known HF name")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection (weight or bias)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot unpermute {rows} rows over {n_heads} heads")
    out = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(out.reshape(w.shape))


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every GGUF key/value as plain Python values (lists for arrays)."""
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            meta[key] = field.contents()
    return meta


def _open(gguf_path: Path) -> GGUFReader:
    """Open a GGUF file, turning a corrupt one into a WeightsError naming it."""
    if not gguf_path.is_file():
        raise WeightsError(f"GGUF file not found: {gguf_path}")
    from gguf import GGUFReader
    try:
        return GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises ValueError/struct errors/... on bad files
        raise WeightsError(f"cannot read GGUF file {gguf_path}: {exc}") from exc


def hyperparameters(meta: dict[str, Any]) -> dict[str, Any]:
    """The model shape from GGUF metadata; UnsupportedModelError for other architectures."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise WeightsError(f"GGUF metadata is missing '{arch}.{key}'")
        return value

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    return {
        "n_layer": int(get("block_count")),
        "n_embd": n_embd,
        "n_ff": int(get("feed_forward_length")),
        "n_head": n_head,
        "n_head_kv": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("attention.key_length", n_embd // n_head)),
        "rms_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "n_ctx": int(get("context_length")),
        "rope_scaling": _rope_scaling(meta, arch),
    }


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``<arch>.rope.scaling.*``, or None."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert ``gguf_path`` into an HF-layout directory ``out_dir`` (created if needed).

    Example::

        convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "/tmp/smollm2")
        # -> /tmp/smollm2/{config.json, model.safetensors, tokenizer.json, ...}

    Raises UnsupportedModelError for an architecture, tensor or tokenizer that
    cupaged does not implement, WeightsError for an unreadable file.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    meta = read_metadata(reader)
    hp = hyperparameters(meta)
    tokenizer = build_tokenizer(meta)
    names = {t.name for t in reader.tensors}
    for name in names:
        hf_name(name)  # fail before any work on an unknown tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tensors(reader, hp, out_dir, progress)
    vocab_size = len(meta["tokenizer.ggml.tokens"])
    config = hf_config(hp, meta, vocab_size, tied="output.weight" not in names)
    if any(n.endswith("attn_q.bias") for n in names):
        config["attention_bias"] = True
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config(meta))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta, hp["n_ctx"]))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    log.info("converted %s -> %s", gguf_path, out_dir)
    return out_dir


def _dequantized(tensor: Any, hp: dict[str, Any]) -> np.ndarray:
    """One GGUF tensor as float32 (rows, cols) in HF order, rotary rows restored."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    local = tensor.name.split(".", 2)[-1]
    if tensor.name.startswith("blk.") and local in PERMUTED:
        values = unpermute_rotary(values, hp[PERMUTED[local]])
    return np.ascontiguousarray(values)


def _shard_plan(reader: GGUFReader) -> list[list[Any]]:
    """Group tensors into shards of at most SHARD_BYTES float32 bytes, in file order."""
    shards: list[list[Any]] = [[]]
    size = 0
    for tensor in reader.tensors:
        nbytes = int(tensor.n_elements) * 4
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _write_tensors(reader: GGUFReader, hp: dict[str, Any], out_dir: Path, progress: bool) -> None:
    """Dequantize every tensor and write float32 safetensors (sharded when large)."""
    shards = _shard_plan(reader)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(reader.tensors), desc="convert", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor in shard:
            arrays[hf_name(tensor.name)] = _dequantized(tensor, hp)
            weight_map[hf_name(tensor.name)] = fname
            bar.update(1)
        save_file(arrays, str(out_dir / fname), metadata={"format": "pt"})
        del arrays
    bar.close()
    if len(shards) > 1:
        total = sum(int(t.n_elements) * 4 for t in reader.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out_dir / "model.safetensors.index.json", index)


def hf_config(hp: dict[str, Any], meta: dict[str, Any], vocab_size: int, tied: bool) -> dict[str, Any]:
    """The HF ``config.json`` of a LlamaForCausalLM with these hyperparameters."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp["n_embd"],
        "intermediate_size": hp["n_ff"],
        "num_hidden_layers": hp["n_layer"],
        "num_attention_heads": hp["n_head"],
        "num_key_value_heads": hp["n_head_kv"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": hp["rms_eps"],
        "rope_theta": hp["rope_theta"],
        "max_position_embeddings": hp["n_ctx"],
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "rope_scaling": hp["rope_scaling"],
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            config[key.replace("padding", "pad")] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The HF ``generation_config.json``: BOS, EOS (plus EOT/EOM if distinct) and PAD ids."""
    config: dict[str, Any] = {}
    ids = {key: meta.get(f"tokenizer.ggml.{key}") for key in
           ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id")}
    if ids["bos_token_id"] is not None:
        config["bos_token_id"] = int(ids["bos_token_id"])
    stops = [int(ids[k]) for k in ("eos_token_id", "eot_token_id", "eom_token_id") if ids[k] is not None]
    stops = list(dict.fromkeys(stops))
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if ids["padding_token_id"] is not None:
        config["pad_token_id"] = int(ids["padding_token_id"])
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
