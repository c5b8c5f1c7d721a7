"""ModelConfig: the few numbers of a Llama-family config.json that the model needs."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cupaged.errors import UnsupportedModelError, WeightsError
from cupaged.validation import is_finite, is_int

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0           # 0: full attention
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise WeightsError(f"{model_dir}: no config.json (a model directory needs config.json and *.safetensors)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: not valid JSON: {e}") from e
        except KeyError as e:
            raise WeightsError(f"{path}: the model config has no {e.args[0]!r}") from e
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise WeightsError(f"{path}: cannot read the model config: {e}") from e
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from e

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        if not isinstance(c, dict):
            raise WeightsError(f"the model config must be a JSON object, got {type(c).__name__}")
        model_type = c.get("model_type", "")
        if model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; cupaged runs {sorted(SUPPORTED)}")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = c.get("eos_token_id")
        window = c.get("sliding_window") or 0
        if model_type in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
            window = 0
        heads = c["num_attention_heads"]
        config = cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            max_position=c.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=rope,
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(window),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
        config.check()
        return config

    def check(self) -> None:
        """Types and ranges of the fields the model computes with; a WeightsError names the first bad one."""
        def bad(name: str, what: str) -> None:
            raise WeightsError(f"{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        if not is_int(self.max_position) or self.max_position < 2:
            bad("max_position", "an int >= 2 (config.json max_position_embeddings)")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"a divisor of num_heads {self.num_heads}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not is_finite(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a finite number > 0")
        if not is_int(self.sliding_window) or self.sliding_window < 0:
            bad("sliding_window", "an int >= 0")
        if not all(is_int(t) and 0 <= t < self.vocab_size for t in self.eos_token_ids):
            bad("eos_token_ids", f"token ids in [0, {self.vocab_size})")

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def rope_cos_sin(self, max_position: int) -> np.ndarray:
        """[max_position, head_dim] float32: cos in the first half of the columns, sin in the second."""
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if rope_type == "llama3":
            inv_freq = _llama3_scale(inv_freq, self.rope_scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / self.rope_scaling["factor"]
        elif rope_type is not None:
            raise UnsupportedModelError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3 are)")
        angles = np.outer(np.arange(max_position, dtype=np.float64), inv_freq)
        return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept, smooth between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
