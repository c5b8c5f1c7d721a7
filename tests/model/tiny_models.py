"""Tiny randomly initialised models of every architecture cupaged runs, built and saved by transformers.

Each spec is a transformers config class name and its keyword arguments. `build_tiny_model` makes
the model, fills every RMSNorm weight and bias with random values (a fresh model has ones and zeros,
which would hide a missing norm or bias), saves it as safetensors and copies in a tokenizer so that
our engine can open the directory. Prompts are token ids below VOCAB.
"""
from __future__ import annotations

import shutil
from pathlib import Path

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256,
               initializer_range=0.15, bos_token_id=1, eos_token_id=2)

SPECS: dict[str, tuple[str, dict]] = {
    # GQA 4:2, llama3 rope scaling from a 16-token original context: every frequency with a
    # wavelength above 4 positions is scaled or smoothed, and prompts run past position 16.
    "llama3-gqa": ("LlamaConfig", dict(
        _COMMON, hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Tied embeddings, head_dim 48 with hidden 128 (q is 4 x 48 = 192 wide), 3 layers, MHA.
    "llama-tied-hd48": ("LlamaConfig", dict(
        _COMMON, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
        head_dim=48, num_hidden_layers=3, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # An 8-token sliding window: prompts longer than that see only their last 8 positions.
    "mistral-swa8": ("MistralConfig", dict(
        _COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=8, tie_word_embeddings=False)),
    # Q/K/V biases (randomised below).
    "qwen2-bias": ("Qwen2Config", dict(
        _COMMON, hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=False, use_sliding_window=False)),
    # Q/K RMSNorm over head_dim 48, which is not hidden / heads (128 / 4 = 32).
    "qwen3-qknorm": ("Qwen3Config", dict(
        _COMMON, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, tie_word_embeddings=False, use_sliding_window=False)),
    # head_dim 64, which the CUDA kernels are built for: the fast model of the emulation tests.
    "llama-hd64": ("LlamaConfig", dict(
        _COMMON, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def write_tiny_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer of exactly VOCAB tokens, trained here on a fixed text (no download):
    ids 0-2 are <|pad|>, <|im_start|> (bos) and <|endoftext|> (eos), as the tiny configs expect."""
    import json
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|im_start|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)  # words drawn from a fixed seed give enough distinct pairs to merge
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    text = [" ".join(words), "Un café, s'il vous plaît: naïve façade, größer, 東京, 🙂. " * 8]
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}))


def build_tiny_model(name: str, out_dir: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Save model `name` of SPECS into out_dir (safetensors + config.json + tokenizer files). The
    tokenizer is copied from tokenizer_dir, else a tiny one is made (`write_tiny_tokenizer`)."""
    import torch
    import transformers

    config_cls, kwargs = SPECS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):      # input/post-attention/final/q/k RMSNorm
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif pname.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_dir is None:
        write_tiny_tokenizer(out_dir)
        return out_dir
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
    return out_dir
