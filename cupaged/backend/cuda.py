"""The CUDA backend: device arrays, the kernels of cuda/*.cu, and cuBLAS for the GEMMs.

Each op is a thin wrapper: it checks shapes, dtypes and contiguity (never values, so there is
no hidden device -> host sync), allocates its output and launches the kernel named by the
compute dtype (`rms_norm_f16`, `paged_decode_bf16_d128_g4`, ...). Launch geometry and shared
memory sizes follow the design note at the top of each kernel file.

dtypes. Weights, activations and the KV cache are float16 or bfloat16, with fp32 accumulation
inside every kernel and GEMM. bfloat16 arrays are **uint16 arrays of bf16 bit patterns** on every
device: CuPy has bfloat16 only through the optional ml_dtypes, NumPy not at all, and every op that
touches bf16 values is a kernel or cuBLAS call that takes the type from its name, never from the
array. Array methods used by the model (slicing, reshape, copy, fancy-index gathers, take) move
bits and so work on uint16 unchanged; arithmetic on bf16 arrays through xp would be wrong and is
never done. Hence `ops.dtype` is the dtype token the model passes to `asarray` / `zeros`:
np.float16, or the string "bfloat16" (stored as uint16), and `to_numpy` turns bf16 arrays into
float32 on the host (NumPy cannot hold bf16). The rope cos/sin table stays float32.

The device is pluggable (`cupaged.backend.kernels.Device`): `CupyDevice` on a GPU, and in the test
suite an emulation device that runs the same kernels through the host emulator on NumPy arrays.

    >>> ops = CudaOps(dtype="bfloat16")               # needs CuPy and a GPU
    >>> x = ops.asarray(np.ones((2, 64), np.float32), ops.dtype)
    >>> ops.to_numpy(ops.rms_norm(x, ops.asarray(np.ones(64, np.float32), ops.dtype), 1e-6))[0, :2]
    array([1., 1.], dtype=float32)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from cupaged.backend.cupy_device import CupyDevice
from cupaged.backend.kernels import Device, Kernel, launch
from cupaged.util import bf16_bits_to_float, cdiv, float_to_bf16_bits
from cupaged.backend.ops import Array, AttnMetadata, Ops, block_runs, check_swap

logger = logging.getLogger(__name__)
BFLOAT16 = "bfloat16"
HEAD_DIMS = (64, 80, 96, 128, 256)    # the head sizes the attention kernels are built for
DECODE_THREADS = PREFILL_THREADS = 128
_I32 = np.dtype(np.int32)
_F32 = np.dtype(np.float32)


def heads_per_block(g: int) -> int:
    """Query heads one decode block serves (GP): the smallest of 1, 2, 4, 8 that is >= min(G, 8)."""
    return next(p for p in (1, 2, 4, 8) if p >= min(g, 8))


@dataclass(slots=True)
class AttnPlan:
    """One step's attention plan, made at its first layer and reused by every other (FlashInfer's
    plan/run split): the metadata's checks, and the decode's scratch, all layers running in turn."""

    meta: AttnMetadata
    b: int                                   # sequences in the step
    scratch: dict = field(default_factory=dict)  # (Hq, D, parts) -> decode partials (max, sum, out)


class CudaOps(Ops):
    """`Ops` on a CUDA device (CuPy by default). Shapes as in `cupaged.backend.ops`.

    dtype: "float16" or "bfloat16". partition_size: keys per decode partition (flash-decoding
    split); 512 on a GPU, smaller in emulation tests so that short contexts split too."""

    name = "cuda"

    def __init__(self, device: Device | None = None, dtype: str = "float16", partition_size: int = 512):
        if dtype not in ("float16", BFLOAT16):
            raise ValueError(f"CudaOps dtype must be 'float16' or 'bfloat16', got {dtype!r}")
        if partition_size < 1:
            raise ValueError(f"partition_size must be positive, got {partition_size}")
        self.device = device if device is not None else CupyDevice()
        self.xp = self.device.xp
        self._array_type = self.xp.ndarray  # the checks' fast path: an exact device array
        self.bf16 = dtype == BFLOAT16
        self.dtype = BFLOAT16 if self.bf16 else np.dtype(np.float16)
        self.storage = np.dtype(np.uint16 if self.bf16 else np.float16)  # what the arrays hold
        self.itemsize = 2
        self.sfx = "bf16" if self.bf16 else "f16"
        self.partition_size = int(partition_size)
        self._kernels: dict[tuple[str, str], Kernel] = {}
        self._attn_plan: AttnPlan | None = None  # the step's, made by its first attention layer

    def _kernel(self, file: str, name: str):
        """The Kernel handle of file's entry point name, made once (a step asks for ~300)."""
        kernel = self._kernels.get((file, name))
        if kernel is None:
            kernel = self._kernels[(file, name)] = self.device.kernel(file, name)
        return kernel

    # --- checks (shapes and dtypes only: never values) ------------------------------------
    def _check(self, what: str, a, ndim: int, dtype=None, shape: tuple | None = None) -> None:
        if type(a) is not self._array_type and not self.device.is_array(a):
            raise TypeError(f"{what}: expected a {self.xp.__name__} array, got {type(a).__module__}.{type(a).__name__}")
        if a.ndim != ndim:
            raise ValueError(f"{what}: expected {ndim} dimensions, got shape {a.shape}")
        if dtype is not None and a.dtype != dtype:
            raise TypeError(f"{what}: expected dtype {self._dtype_name(dtype)}, got {a.dtype}")
        if shape is not None:
            for i, s in enumerate(shape):
                if s is not None and a.shape[i] != s:
                    raise ValueError(f"{what}: shape {a.shape} does not match {tuple('*' if v is None else v for v in shape)}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{what}: array is not C-contiguous (shape {a.shape}, strides {a.strides})")

    def _dtype_name(self, dtype) -> str:
        return "bfloat16 (uint16 bits)" if self.bf16 and dtype == self.storage else str(np.dtype(dtype))

    def _np_dtype(self, dtype) -> np.dtype:
        return self.storage if isinstance(dtype, str) and dtype == BFLOAT16 else np.dtype(dtype)

    # --- arrays -----------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """A C-contiguous device array of `x`. dtype "bfloat16" converts float values to bf16 bit
        patterns (rounded to nearest even); a uint16 input is taken as bf16 bits already."""
        xp = self.xp
        if isinstance(dtype, str) and dtype == BFLOAT16:
            if self.device.is_array(x) and x.dtype == np.uint16:
                return xp.ascontiguousarray(x)
            if not self.device.is_array(x):
                host = np.asarray(x)
                bits = host if host.dtype == np.uint16 else float_to_bf16_bits(np, host)
                return xp.ascontiguousarray(xp.asarray(bits))
            return float_to_bf16_bits(xp, x)
        return xp.ascontiguousarray(xp.asarray(x, dtype=dtype))

    def to_numpy(self, x: Array) -> Any:
        """A host numpy.ndarray of `x`; bf16 arrays (uint16 bits) come back as float32."""
        host = self.xp.asnumpy(x) if hasattr(self.xp, "asnumpy") else np.asarray(x)
        if self.bf16 and host.dtype == np.uint16:
            return bf16_bits_to_float(np, host)
        return host

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """A zero-filled device array ("bfloat16": uint16 zeros, the bits of 0.0)."""
        return self.xp.zeros(shape, dtype=self._np_dtype(dtype))

    def host_zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero-filled numpy.ndarray in pinned host memory (`Device.pinned_empty`); "bfloat16": uint16 bits."""
        out = self.device.pinned_empty(tuple(shape), self._np_dtype(dtype))
        out[...] = 0
        return out

    def upload(self, host: Any, out: Array | None = None) -> Array:
        """One host -> device copy of a NumPy array (pinned staging, asynchronous on the current stream)."""
        if out is not None:
            self._check("upload out", out, out.ndim, np.asarray(host).dtype)
        return self.device.upload(np.asarray(host), out)

    # --- whole-step services ----------------------------------------------------------
    def capture_graph(self, fn: Callable[[], Array]) -> Any:
        """A CUDA graph of fn on this device (None where the device cannot capture)."""
        return self.device.capture(fn)

    def profile_kv_budget(self, run_profile: Callable[[], int], utilization: float) -> int | None:
        """Device memory left for KV blocks, vLLM's way: run the profile forward, then everything in use
        now (weights, the activation peak held by the memory pool, cuBLAS workspace, the CUDA context,
        other processes) is charged against utilization * total; the profile's scratch KV cache is
        freed afterwards, so it is given back."""
        if self.device.memory_info() is None:
            return None
        self.device.release_cached()
        scratch = run_profile()
        free, total = self.device.memory_info()
        self.device.release_cached()
        budget = int(utilization * total) - (total - free) + int(scratch)
        logger.info("memory profile: %.2f GiB of %.2f GiB in use at the peak step (scratch KV %.1f MiB); "
                    "%.2f GiB left for KV blocks at gpu_memory_utilization %.2f", (total - free) / 2**30,
                    total / 2**30, scratch / 2**20, max(budget, 0) / 2**30, utilization)
        return max(budget, 0)

    # --- dense layers -----------------------------------------------------------------
    def embedding(self, ids: Array, table: Array) -> Array:
        """ids [T] int32, table [V, H] -> new [T, H] (a gather of rows; moves bits, so bf16 is fine)."""
        self._check("embedding ids", ids, 1, _I32)
        self._check("embedding table", table, 2, self.storage)
        return self.xp.take(table, ids, axis=0)

    def linear(self, x: Array, weight: Array, bias: Array | None = None) -> Array:
        """x [T, K] @ weight [N, K].T (+ bias [N]) -> new [T, N], one cuBLAS GEMM (fp32 accumulation)
        reading the row-major weight as a transposed operand, with no copy."""
        self._check("linear x", x, 2, self.storage)
        self._check("linear weight", weight, 2, self.storage, (None, x.shape[1]))
        if bias is not None:
            self._check("linear bias", bias, 1, self.storage, (weight.shape[0],))
        return self.device.gemm(x, weight, bias, bf16=self.bf16)

    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """x [T, H], weight [H] -> new [T, H]. cuda/layernorm.cu, one block of 256 threads per row."""
        self._check("rms_norm x", x, 2, self.storage)
        t, h = x.shape
        self._check("rms_norm weight", weight, 1, self.storage, (h,))
        out = self.xp.empty_like(x)
        if t:
            launch(self._kernel("layernorm.cu", f"rms_norm_{self.sfx}"), grid=(t,), block=(256,),
                   args=[out, x, weight, np.float32(eps), np.int32(h)], shared_mem=0)
        return out

    def fused_add_rms_norm(self, x: Array, residual: Array, weight: Array, eps: float) -> Array:
        """residual [T, H] += x in place; returns rms_norm(residual), a new [T, H]."""
        self._check("fused_add_rms_norm residual", residual, 2, self.storage)
        t, h = residual.shape
        self._check("fused_add_rms_norm x", x, 2, self.storage, (t, h))
        self._check("fused_add_rms_norm weight", weight, 1, self.storage, (h,))
        out = self.xp.empty_like(residual)
        if t:
            launch(self._kernel("layernorm.cu", f"fused_add_rms_norm_{self.sfx}"), grid=(t,), block=(256,),
                   args=[out, residual, x, weight, np.float32(eps), np.int32(h)], shared_mem=0)
        return out

    def rotary_embedding(self, positions: Array, q: Array, k: Array, cos_sin_cache: Array, is_neox: bool) -> None:
        """In place on q [T, Hq, D] and k [T, Hk, D]; cos_sin_cache float32 [max_pos, rot_dim] = [cos | sin].
        cuda/rotary.cu, one block of 128 threads per token."""
        self._check("rotary q", q, 3, self.storage)
        t, hq, d = q.shape
        self._check("rotary k", k, 3, self.storage, (t, None, d))
        self._check("rotary positions", positions, 1, _I32, (t,))
        self._check("rotary cos_sin_cache", cos_sin_cache, 2, _F32)
        rot = cos_sin_cache.shape[1]
        if rot % 2 or rot > d:
            raise ValueError(f"rotary: rot_dim {rot} must be even and <= head_dim {d}")
        hk = k.shape[1]
        if t:
            launch(self._kernel("rotary.cu", f"rotary_embedding_{self.sfx}"), grid=(t,), block=(128,),
                   args=[positions, q, k, cos_sin_cache, np.int32(hq * d), np.int32(hk * d), np.int32(hq),
                         np.int32(hk), np.int32(d), np.int32(rot), np.int32(1 if is_neox else 0)], shared_mem=0)

    def silu_and_mul(self, x: Array) -> Array:
        """x [T, 2I] -> new [T, I]. cuda/activation.cu, grid (T, ceil(I / 2048)), 256 threads."""
        self._check("silu_and_mul x", x, 2, self.storage)
        t, two_i = x.shape
        if two_i % 2:
            raise ValueError(f"silu_and_mul: x has an odd width {two_i}")
        i = two_i // 2
        out = self.xp.empty((t, i), dtype=self.storage)
        if t and i:
            launch(self._kernel("activation.cu", f"silu_and_mul_{self.sfx}"), grid=(t, cdiv(i, 256 * 8)),
                   block=(256,), args=[out, x, np.int32(i)], shared_mem=0)
        return out

    # --- paged KV cache ---------------------------------------------------------------
    def _check_caches(self, k_cache, v_cache) -> None:
        self._check("k_cache", k_cache, 4, self.storage)
        self._check("v_cache", v_cache, 4, self.storage, k_cache.shape)

    def write_kv(self, k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array) -> None:
        """k, v [T, Hk, D] -> k_cache, v_cache [NB, BS, Hk, D] at slot_mapping [T] (< 0 skipped).
        cuda/kv_cache.cu reshape_and_cache, one block of 128 threads per token."""
        self._check_caches(k_cache, v_cache)
        _, _, hk, d = k_cache.shape
        self._check("write_kv k", k, 3, self.storage, (None, hk, d))
        t = k.shape[0]
        self._check("write_kv v", v, 3, self.storage, (t, hk, d))
        self._check("write_kv slot_mapping", slot_mapping, 1, _I32, (t,))
        if t:
            row = np.int32(hk * d)
            launch(self._kernel("kv_cache.cu", f"reshape_and_cache_{self.sfx}"), grid=(t,), block=(128,),
                   args=[k_cache, v_cache, k, v, slot_mapping, row, row, row], shared_mem=0)

    def copy_blocks(self, k_cache: Array, v_cache: Array, pairs: Array) -> None:
        """pairs [P, 2] int32 of (src, dst): one launch for this layer's K and V, grid (P, 2), 256 threads.
        No dst may be a src or repeat within one call (the blocks are copied concurrently)."""
        self._check_caches(k_cache, v_cache)
        self._check("copy_blocks pairs", pairs, 2, _I32, (None, 2))
        n = pairs.shape[0]
        if n:
            nb, bs, hk, d = k_cache.shape
            launch(self._kernel("kv_cache.cu", f"copy_blocks_{self.sfx}"), grid=(n, 2), block=(256,),
                   args=[k_cache, v_cache, pairs, np.int32(bs * hk * d)], shared_mem=0)

    def swap_blocks(self, src_k: Array, src_v: Array, dst_k: Array, dst_v: Array, pairs: Any) -> None:
        """pairs [P, 2] (src, dst) block ids, host data. Blocks are grouped into runs of consecutive ids on
        both sides (`block_runs`); with the layout [NB, BS, Hk, D] a run is one contiguous chunk, moved by
        one asynchronous copy per run for K and one for V on the device's copy stream (`Device.copy_async`)."""
        pairs = check_swap(src_k, src_v, dst_k, dst_v, pairs)
        for what, a in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v)):
            if a.dtype != self.storage or not a.flags.c_contiguous:
                raise TypeError(f"swap_blocks {what}: expected a C-contiguous {self._dtype_name(self.storage)} "
                                f"array, got {a.dtype} with strides {a.strides}")
        copies = []
        for src, dst, n in block_runs(pairs):
            copies += [(dst_k[dst:dst + n], src_k[src:src + n]), (dst_v[dst:dst + n], src_v[src:src + n])]
        if copies:
            self.device.copy_async(copies)

    def paged_attention(self, q: Array, k_cache: Array, v_cache: Array, meta: AttnMetadata,
                        scale: float, sliding_window: int = 0) -> Array:
        """q [T, Hq, D] -> new out [T, Hq, D]; see `AttnMetadata` for the causal rule.

        A step whose every sequence has one new token (meta.max_query_len == 1, query row b =
        sequence b) runs the decode kernel (cuda/paged_attention.cu), split into partitions of
        `partition_size` keys plus a merge when the longest context needs more than one. Any
        other step runs the tiled prefill kernel (cuda/paged_prefill.cu), which serves prefill
        chunks and decodes in one mixed batch. Rows past query_start_loc[-1] (padding) are zeros."""
        self._check("paged_attention q", q, 3, self.storage)
        self._check_caches(k_cache, v_cache)
        t, hq, d = q.shape
        _, bs, hk, dk = k_cache.shape
        if dk != d or hq % hk:
            raise ValueError(f"paged_attention: q {q.shape} does not fit cache {k_cache.shape}")
        if d not in HEAD_DIMS:
            raise ValueError(f"paged_attention: head_dim {d} has no kernel; supported: {HEAD_DIMS}")
        if bs & (bs - 1):
            raise ValueError(f"paged_attention: block_size {bs} is not a power of two")
        plan = self._plan(meta)
        b = plan.b
        window = max(0, int(sliding_window))
        if b == 0 or t == 0:
            return self.xp.zeros((t, hq, d), dtype=self.storage)
        if meta.max_query_len == 1:
            if t < b:
                raise ValueError(f"paged_attention: a decode step of {b} sequences needs >= {b} query rows, got {t}")
            return self._decode(q, k_cache, v_cache, plan, hk, scale, window)
        return self._prefill(q, k_cache, v_cache, meta, b, hk, scale, window)

    def _plan(self, meta: AttnMetadata) -> AttnPlan:
        """The step's plan: made (the metadata checked) at the first layer that brings this meta."""
        plan = self._attn_plan
        if plan is not None and plan.meta is meta:
            return plan
        self._check("block_tables", meta.block_tables, 2, _I32)
        b = meta.block_tables.shape[0]
        self._check("seq_lens", meta.seq_lens, 1, _I32, (b,))
        self._check("query_start_loc", meta.query_start_loc, 1, _I32, (b + 1,))
        self._attn_plan = plan = AttnPlan(meta, b)
        return plan

    def _decode_scratch(self, plan: AttnPlan, hq: int, d: int, parts: int):
        """The partitions' running max and sum [B, Hq, parts] and outputs [B, Hq, parts, D], float32,
        allocated once per step: each layer's decode overwrites what the one before left."""
        key = (hq, d, parts)
        scratch = plan.scratch.get(key)
        if scratch is None:
            xp, b = self.xp, plan.b
            scratch = plan.scratch[key] = (xp.empty((b, hq, parts), dtype=np.float32),
                                           xp.empty((b, hq, parts), dtype=np.float32),
                                           xp.empty((b, hq, parts, d), dtype=np.float32))
        return scratch

    def _decode(self, q, k_cache, v_cache, plan: AttnPlan, hk: int, scale: float, window: int):
        meta, b = plan.meta, plan.b
        t, hq, d = q.shape
        g = hq // hk
        gp = heads_per_block(g)
        span = min(meta.max_seq_len, window) if window else meta.max_seq_len
        parts = max(1, cdiv(span, self.partition_size))
        out = self.xp.empty((t, hq, d), dtype=self.storage)
        if t > b:
            out[b:] = 0  # padding rows (bits of 0.0 in every dtype)
        part_max, part_sum, part_out = self._decode_scratch(plan, hq, d, parts)
        mb, bs = meta.block_tables.shape[1], k_cache.shape[1]
        launch(self._kernel("paged_attention.cu", f"paged_decode_{self.sfx}_d{d}_g{gp}"),
               grid=(hk * cdiv(g, gp), b, parts), block=(DECODE_THREADS,),
               args=[out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, part_max, part_sum, part_out,
                     np.int32(hq), np.int32(hk), np.int32(mb), np.int32(bs), np.int32(self.partition_size),
                     np.float32(scale), np.int32(window)],
               shared_mem=4 * gp * (d + 2) * 4)
        if parts > 1:
            launch(self._kernel("paged_attention.cu", f"paged_decode_reduce_{self.sfx}"), grid=(hq, b),
                   block=(DECODE_THREADS,),
                   args=[out, part_max, part_sum, part_out, meta.seq_lens, np.int32(hq), np.int32(d),
                         np.int32(parts), np.int32(self.partition_size), np.int32(window)],
                   shared_mem=parts * 4)
        return out

    def _prefill(self, q, k_cache, v_cache, meta: AttnMetadata, b: int, hk: int, scale: float, window: int):
        t, hq, d = q.shape
        g = hq // hk
        rows, keys = (32, 16) if d > 128 else (64, 32)   # the kernel's BM x BN tile
        smem = (rows + 2 * keys) * (d + 8) * 2 + rows * (keys + 1) * 4
        out = self.xp.zeros((t, hq, d), dtype=self.storage)  # rows past query_start_loc[-1] stay zero
        mb, bs = meta.block_tables.shape[1], k_cache.shape[1]
        launch(self._kernel("paged_prefill.cu", f"paged_prefill_{self.sfx}_d{d}"),
               grid=(cdiv(meta.max_query_len * g, rows), hk, b), block=(PREFILL_THREADS,),
               args=[out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                     np.int32(hq), np.int32(hk), np.int32(mb), np.int32(bs), np.float32(scale), np.int32(window)],
               shared_mem=smem)
        return out

    # --- sampling ---------------------------------------------------------------------
    def sample(self, logits: Array, temperature: Array, top_k: Array, top_p: Array, uniform: Array) -> Array:
        """logits [S, V] (compute dtype or float32) -> new token ids [S] int32. cuda/sampling.cu: argmax_*
        (grid (S,), 256 threads) when every row is greedy, else sample_top_k_top_p_* (grid (S,), 1024
        threads). The all-greedy test reads host parameters only: parameters already on the device
        always take the sampling kernel, which is greedy per row itself (no device -> host sync)."""
        self._check("sample logits", logits, 2)
        s, v = logits.shape
        sfx = "f32" if logits.dtype == _F32 else self.sfx
        if sfx != "f32" and logits.dtype != self.storage:
            raise TypeError(f"sample logits: expected dtype {self._dtype_name(self.storage)} or float32, "
                            f"got {logits.dtype}")
        out = self.xp.empty(s, dtype=_I32)
        if s == 0:
            return out
        if isinstance(temperature, np.ndarray) and not (temperature > 0).any():
            launch(self._kernel("sampling.cu", f"argmax_{sfx}"), grid=(s,), block=(256,),
                   args=[out, logits, np.int32(v)], shared_mem=0)
            return out
        params = [self._param(f"sample {n}", a, t, s) for n, a, t in
                  (("temperature", temperature, _F32), ("top_k", top_k, _I32), ("top_p", top_p, _F32),
                   ("uniform", uniform, _F32))]
        launch(self._kernel("sampling.cu", f"sample_top_k_top_p_{sfx}"), grid=(s,), block=(1024,),
               args=[out, logits, *params, np.int32(v)], shared_mem=0)
        return out

    def _param(self, what: str, a, dtype, n: int):
        """A per-row parameter [n] as a device array (host values are copied over)."""
        if type(a) is not self._array_type and not self.device.is_array(a):
            a = self.xp.asarray(np.ascontiguousarray(a, dtype=dtype))
        self._check(what, a, 1, dtype, (n,))
        return a
