"""Open a model directory's safetensors and check them against what the config expects."""
from __future__ import annotations

from pathlib import Path

from cupaged.model.config import ModelConfig
from cupaged.model.llama import expected_tensors
from cupaged.weights.loader import Weights, check_finite, check_weights, open_weights

FLOAT_DTYPES = ("F32", "F16", "BF16")


def load_model_weights(model_dir: str | Path, cfg: ModelConfig) -> Weights:
    """Memory-mapped weights of model_dir; WeightsError names any missing, unexpected,
    misshapen or wrongly typed tensor, or one holding NaN or infinity, and its file."""
    weights = open_weights(model_dir)
    expected = {name: (shape, FLOAT_DTYPES) for name, shape in expected_tensors(cfg).items()}
    for name in weights:
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed here
            expected[name] = (weights.raw(name).shape, FLOAT_DTYPES)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:  # tied, but saved anyway
            expected[name] = ((cfg.vocab_size, cfg.hidden_size), FLOAT_DTYPES)
    check_weights(weights, weights.origin, expected)
    check_finite(weights)
    return weights
