"""A model with SmolLM2-135M's shape and real tokenizer but random weights, made where it runs, so a
GPU machine needs no weights carried to it: only config.json and the tokenizer files (~3.5 MB).

    python3 -m cupaged.weights.random_model TOKENIZER_DIR OUT_DIR     # TOKENIZER_DIR: config + tokenizer files
    python3 -m cupaged.weights.random_model --export MODEL_DIR OUT    # here: copy those files out of a model

Weights are float32 safetensors under the names of a converted model (weights/convert_gguf.py), drawn
from a fixed seed: matrices N(0, 0.05^2), norm weights uniform in [0.5, 1.5).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def export_files(model_dir: Path, out: Path) -> Path:
    """Copy the files a random twin needs (FILES that exist) from a converted model."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    return shapes


def build_random_model(files_dir: Path, out_dir: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """out_dir with files_dir's config (with `overrides`, e.g. {"num_hidden_layers": 1}) and tokenizer, and
    random weights of that config's shape."""
    from safetensors.numpy import save_file

    files_dir, out_dir = Path(files_dir), Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    export_files(files_dir, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text()) | (overrides or {})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:
            tensors[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
    save_file(tensors, str(out_dir / "model.safetensors.partial"))
    (out_dir / "model.safetensors.partial").rename(out_dir / "model.safetensors")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="store_true", help="copy config + tokenizer files out of SRC instead")
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    path = export_files(args.src, args.out) if args.export else build_random_model(args.src, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
