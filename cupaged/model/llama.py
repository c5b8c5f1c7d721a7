"""One Llama-family decoder for Llama 2/3, Mistral, Qwen2/2.5 and Qwen3, driven by ModelConfig.

The forward pass only calls backend ops and array methods common to NumPy and CuPy:
    embed -> [rms_norm -> qkv linear -> (q/k norm) -> rope -> write_kv -> paged_attention
              -> o linear -> add+rms_norm -> gate_up linear -> silu_and_mul -> down linear
              -> add+rms_norm] x L -> lm_head on the rows that sample.
Q/K/V and gate/up projections are fused into one weight each at load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cupaged.backend.ops import Array, AttnMetadata, Ops
from cupaged.model.config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: Array      # [H]
    qkv: Array             # [(Hq + 2 Hk) D, H]
    qkv_bias: Array | None  # [(Hq + 2 Hk) D]
    q_norm: Array | None   # [D] (Qwen3)
    k_norm: Array | None   # [D]
    o: Array               # [H, Hq D]
    post_norm: Array       # [H]
    gate_up: Array         # [2 I, H]
    down: Array            # [H, I]


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of this config must hold, with its shape."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    names = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        names.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qkv_bias:
            names.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                          p + "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_norm:
            names.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return names


class LlamaModel:
    def __init__(self, cfg: ModelConfig, ops: Ops, tensors: dict[str, np.ndarray]):
        """tensors: host arrays by HF name (already checked against expected_tensors); they go to the
        device in the backend's compute dtype `ops.dtype`."""
        self.cfg, self.ops = cfg, ops
        dtype, matrix_dtype = ops.dtype, ops.weight_dtype or ops.dtype

        release = getattr(tensors, "release", None)  # Weights: drop mapped pages once copied

        def dev(*names: str, dtype=dtype) -> Array:
            parts = [np.asarray(tensors[n], dtype=np.float32) for n in names]
            out = ops.asarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0), dtype)
            if release is not None and not any(np.may_share_memory(out, p) for p in parts):
                for n in names:
                    release(n)  # held as a copy (fused, converted or on the device): the file's pages can go
            return out

        def matrix(*names: str) -> Array:  # weight matrices: in ops.weight_dtype (bf16 on the CPU if asked)
            return dev(*names, dtype=matrix_dtype)

        self.embed = matrix("model.embed_tokens.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else matrix("lm_head.weight")
        self.norm = dev("model.norm.weight")
        self.layers = [self._layer(dev, matrix, f"model.layers.{n}.") for n in range(cfg.num_layers)]
        self.cos_sin = ops.asarray(cfg.rope_cos_sin(cfg.max_position), np.float32)
        self.scale = cfg.head_dim ** -0.5

    def _layer(self, dev, matrix, p: str) -> LayerWeights:
        cfg, a = self.cfg, p + "self_attn."
        return LayerWeights(
            input_norm=dev(p + "input_layernorm.weight"),
            qkv=matrix(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            qkv_bias=dev(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") if cfg.qkv_bias else None,
            q_norm=dev(a + "q_norm.weight") if cfg.qk_norm else None,
            k_norm=dev(a + "k_norm.weight") if cfg.qk_norm else None,
            o=matrix(a + "o_proj.weight"),
            post_norm=dev(p + "post_attention_layernorm.weight"),
            gate_up=matrix(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            down=matrix(p + "mlp.down_proj.weight"),
        )

    def forward(self, input_ids: Array, meta: AttnMetadata, kv_caches: list[tuple[Array, Array]]) -> Array:
        """input_ids [T] int32 -> logits [S, V] in the compute dtype (float32 on the CPU, fp16/bf16 on CUDA)
        for the rows meta.logits_indices [S]."""
        ops, layers = self.ops, self.layers
        residual = ops.embedding(input_ids, self.embed)          # [T, H]
        h = ops.rms_norm(residual, layers[0].input_norm, self.cfg.rms_norm_eps)
        for n, layer in enumerate(layers):
            h = self._attention(h, layer, meta, kv_caches[n])
            h = ops.fused_add_rms_norm(h, residual, layer.post_norm, self.cfg.rms_norm_eps)
            h = ops.linear(ops.silu_and_mul(ops.linear(h, layer.gate_up)), layer.down)
            next_norm = layers[n + 1].input_norm if n + 1 < len(layers) else self.norm
            h = ops.fused_add_rms_norm(h, residual, next_norm, self.cfg.rms_norm_eps)
        return ops.linear(h[meta.logits_indices], self.lm_head)

    def _attention(self, h: Array, layer: LayerWeights, meta: AttnMetadata, cache: tuple[Array, Array]) -> Array:
        cfg, ops = self.cfg, self.ops
        t, d = h.shape[0], cfg.head_dim
        nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
        qkv = ops.linear(h, layer.qkv, layer.qkv_bias)           # [T, (Hq + 2 Hk) D]
        q = qkv[:, :nq].reshape(t, cfg.num_heads, d).copy()     # [T, Hq, D]
        k = qkv[:, nq:nq + nkv].reshape(t, cfg.num_kv_heads, d).copy()  # [T, Hk, D]
        v = qkv[:, nq + nkv:].reshape(t, cfg.num_kv_heads, d).copy()
        if layer.q_norm is not None:
            q = ops.rms_norm(q.reshape(-1, d), layer.q_norm, cfg.rms_norm_eps).reshape(q.shape)
            k = ops.rms_norm(k.reshape(-1, d), layer.k_norm, cfg.rms_norm_eps).reshape(k.shape)
        ops.rotary_embedding(meta.positions, q, k, self.cos_sin, True)
        ops.write_kv(k, v, cache[0], cache[1], meta.slot_mapping)
        out = ops.paged_attention(q, cache[0], cache[1], meta, self.scale, cfg.sliding_window)
        return ops.linear(out.reshape(t, nq), layer.o)
