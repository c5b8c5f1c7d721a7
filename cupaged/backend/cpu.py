"""The CPU backend: NumPy arrays and Numba kernels, the GEMMs included (`cpu_gemm` says why not BLAS).

The compute dtype is float32. Weight matrices (linear layers, embeddings) are float32, or with
`CpuOps(weights="bfloat16")` bfloat16 bit patterns (uint16: half the bytes a decode step streams),
widened to float32 inside the GEMM and the embedding gather. Kernels live in `cupaged.backend.cpu_kernels`, `cpu_gemm` and
`cpu_math`; all run on Numba's one pool of threads (OpenMP) and are compiled
on first use and cached on disk (`NUMBA_CACHE_DIR` moves the cache). Ops that return a new
array allocate it here; ops documented as in place write into the arrays they are given.

Example:
    >>> import numpy as np
    >>> from cupaged.backend.cpu import CpuOps
    >>> ops = CpuOps()
    >>> x = np.ones((2, 4), np.float32)
    >>> ops.rms_norm(x, np.full(4, 2.0, np.float32), 1e-6).round(3)[0].tolist()
    [2.0, 2.0, 2.0, 2.0]
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numba
import numpy as np

from cupaged.backend import cpu_kernels as K
from cupaged.backend.cpu_gemm import matmul_nt
from cupaged.backend.cpu_math import silu_and_mul
from cupaged.backend.cpu_quant import Q8Matrix, matmul_q8, quantize_q8_0
from cupaged.backend.host_sampling import top_k_top_p_keep
from cupaged.backend.ops import Array, AttnMetadata, Ops, check_swap
from cupaged.errors import InvalidRequestError
from cupaged.util import aligned, aligned_empty, bf16_bits_to_float, float_to_bf16_bits

_I32 = np.int32
GEMMS = ("numba", "blas")  # CpuOps(gemm=...) / $CUPAGED_CPU_GEMM
WEIGHTS = ("float32", "bfloat16", "q8_0")  # CpuOps(weights=...)
BF16 = "bfloat16"  # the dtype token of bf16 arrays (held as uint16 bits)
Q8_0 = "q8_0"      # the dtype token of 8-bit block-scaled matrices (cpu_quant.Q8Matrix)


def _i32(x: Array) -> np.ndarray:
    """An int32 C-contiguous view (or copy, only if needed) of an index array."""
    return np.ascontiguousarray(x, dtype=_I32)


def kernels_cached() -> bool:
    """Does Numba's disk cache hold the main CPU kernels (if not, the first step compiles them)?
    Reads Numba's cache index path, an internal; if that moves, answers True (no note shown)."""
    try:
        return all(os.path.exists(kernel._cache._cache_file._index_path)
                   for kernel in (K.paged_attention, matmul_nt, silu_and_mul))
    except AttributeError:
        return True


def _to_bf16_in_chunks(x: Any, chunk: int = 1 << 20) -> np.ndarray:
    """float values -> bf16 bits, converted a million elements at a time so the temporaries stay small
    (the embedding table would otherwise need three float32-sized ones)."""
    x = np.ascontiguousarray(x)
    out = aligned_empty(x.shape, np.uint16)
    src, dst = x.reshape(-1), out.reshape(-1)
    for start in range(0, src.size, chunk):
        dst[start:start + chunk] = float_to_bf16_bits(np, src[start:start + chunk])
    return out


class CpuOps(Ops):
    """`Ops` on NumPy arrays. Shapes as in `cupaged.backend.ops`."""

    name = "cpu"
    dtype = np.float32   # the compute dtype: weights, activations and KV cache
    itemsize = 4

    def __init__(self, gemm: str | None = None, weights: str = "float32"):
        """gemm: "numba" (`cpu_gemm.matmul_nt`, the default) or "blas" (NumPy's matmul, for machines
        where its BLAS wins; bf16 weights always take matmul_nt); None reads $CUPAGED_CPU_GEMM. With
        "blas" from the environment, `cpu_math` keeps Numba on its workqueue layer, whose parked
        threads leave BLAS's alone. weights: "float32", "bfloat16" or "q8_0", the storage of weight
        matrices (computed in float32, except a q8_0 decode's int8 activations on AVX-512 VNNI CPUs,
        cpu_vnni). The GEMMs split their rows among the threads Numba has now (NUMBA_NUM_THREADS, or
        numba.set_num_threads before this): numba.get_num_threads() costs ~1.2 us a call, and a decode
        step makes 121 GEMMs."""
        gemm = gemm or os.environ.get("CUPAGED_CPU_GEMM") or "numba"
        if gemm not in GEMMS:
            raise InvalidRequestError(f"CPU GEMM must be one of {', '.join(GEMMS)} (CUPAGED_CPU_GEMM), got {gemm!r}")
        if weights not in WEIGHTS:
            raise InvalidRequestError(f"CPU weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        self.gemm = gemm
        self.threads = numba.get_num_threads()
        self.weight_dtype = np.float32 if weights == "float32" else weights

    @property
    def dtype_name(self) -> str:
        return "float32" if self.weight_dtype is np.float32 else f"float32, {self.weight_dtype} weights"

    # --- arrays -----------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """A C-contiguous numpy array of `x`; no copy when `x` already is one of that dtype and, from
        64 KiB on, starts on a 64-byte boundary (util.aligned_empty says why). Otherwise an aligned
        copy: for the loader's weights, a copy off the file mapping, whose pages the loader then drops.
        dtype "bfloat16": float values -> bf16 bits (uint16), rounded to nearest even; "q8_0": a
        Q8Matrix (cpu_quant)."""
        if isinstance(dtype, str) and dtype == BF16:
            return _to_bf16_in_chunks(x)
        if isinstance(dtype, str) and dtype == Q8_0:
            return quantize_q8_0(x)
        return aligned(np.ascontiguousarray(x, dtype=dtype))

    def to_numpy(self, x: Array) -> Any:
        """`x` as a numpy.ndarray (no copy)."""
        return np.asarray(x)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """A zero-filled array."""
        return np.zeros(shape, dtype=dtype)

    def host_zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero-filled array (host and device memory are the same here)."""
        return np.zeros(shape, dtype=dtype)

    def upload(self, host: Any, out: Array | None = None) -> Array:
        """Host memory is the backend's memory: `host` itself, or copied into `out`."""
        if out is None:
            return np.ascontiguousarray(host)
        out.reshape(-1)[...] = np.asarray(host).reshape(-1)
        return out

    # --- whole-step services ----------------------------------------------------------
    def capture_graph(self, fn: Callable[[], Array]) -> Any:
        """No graphs on the CPU: every step runs eagerly."""
        return None

    def profile_kv_budget(self, run_profile: Callable[[], int], utilization: float) -> int | None:
        """The CPU pool is sized from host RAM (EngineConfig.kv_cache_memory)."""
        return None

    # --- dense layers -----------------------------------------------------------------
    def embedding(self, ids: Array, table: Array) -> Array:
        """ids [T], table [V, H] float32 or bf16 bits -> [T, H] float32 (a gather, new array)."""
        if isinstance(table, Q8Matrix):
            return table.dequantize(np.asarray(ids))
        rows = np.take(table, ids, axis=0)
        return bf16_bits_to_float(np, rows) if table.dtype == np.uint16 else rows

    def linear(self, x: Array, weight: Array, bias: Array | None = None) -> Array:
        """x [T, K] @ weight [N, K].T (+ bias [N]) -> new [T, N] float32; weight float32, bf16 bits or
        a Q8Matrix, read in place, never copied."""
        if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
            # matmul_nt does not bounds-check: a K mismatch would read past the end of a row.
            raise ValueError(f"linear: x {x.shape} does not fit weight {weight.shape} (want [T, K] and [N, K])")
        out = self._matmul(np.ascontiguousarray(x, dtype=np.float32), weight)
        if bias is not None:
            out += bias
        return out

    def _matmul(self, x: np.ndarray, weight: Array) -> np.ndarray:
        """By `cpu_gemm.matmul_nt` (which says why not NumPy's BLAS), `cpu_quant.matmul_q8`, or NumPy's
        matmul for float32 weights with gemm="blas"."""
        threads = self.threads
        out = aligned_empty((x.shape[0], weight.shape[0]), np.float32)
        if isinstance(weight, Q8Matrix):
            matmul_q8(x, weight.q, weight.scale, out, threads)
        elif weight.dtype == np.uint16:  # bf16 bits
            matmul_nt(x, np.ascontiguousarray(weight), out, threads)
        elif self.gemm == "blas":
            np.matmul(x, weight.T, out=out)  # weight.T is a view: BLAS reads it with a transpose flag
        else:
            matmul_nt(x, np.ascontiguousarray(weight, np.float32), out, threads)
        return out

    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """x [T, H], weight [H] -> new [T, H]."""
        out = aligned_empty(x.shape, x.dtype)
        (K.rms_norm if x.shape[0] < K.PARALLEL_ROWS else K.rms_norm_par)(x, weight, np.float32(eps), out)
        return out

    def fused_add_rms_norm(self, x: Array, residual: Array, weight: Array, eps: float) -> Array:
        """residual [T, H] += x in place; returns rms_norm(residual), a new [T, H]."""
        out = aligned_empty(residual.shape, residual.dtype)
        (K.fused_add_rms_norm if x.shape[0] < K.PARALLEL_ROWS else K.fused_add_rms_norm_par)(
            x, residual, weight, np.float32(eps), out)
        return out

    def rotary_embedding(self, positions: Array, q: Array, k: Array, cos_sin_cache: Array, is_neox: bool) -> None:
        """In place on q [T, Hq, D] and k [T, Hk, D]; cos_sin_cache [max_pos, rot_dim] = [cos | sin]."""
        K.rotary_embedding(_i32(positions), q, k, cos_sin_cache, bool(is_neox))

    def silu_and_mul(self, x: Array) -> Array:
        """x [T, 2I] -> new [T, I] = silu(gate) * up (cpu_math.silu_and_mul: a vectorized exp)."""
        if x.shape[1] % 2:
            raise ValueError(f"silu_and_mul: x has an odd width {x.shape[1]}")
        out = aligned_empty((x.shape[0], x.shape[1] // 2), np.float32)
        silu_and_mul(np.ascontiguousarray(x, dtype=np.float32), out)
        return out

    # --- paged KV cache ---------------------------------------------------------------
    def write_kv(self, k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array) -> None:
        """k, v [T, Hk, D] -> k_cache, v_cache [NB, BS, Hk, D] at slot_mapping [T] (< 0 skipped)."""
        K.write_kv(k, v, k_cache, v_cache, _i32(slot_mapping))

    def paged_attention(self, q: Array, k_cache: Array, v_cache: Array, meta: AttnMetadata,
                        scale: float, sliding_window: int = 0) -> Array:
        """q [T, Hq, D] -> new out [T, Hq, D]; see `AttnMetadata` for the causal rule.

        Rows of tokens past query_start_loc[-1] (padding) come back as zeros.
        """
        t_n, hq, d_n = q.shape
        if k_cache.shape[3] != d_n or hq % k_cache.shape[2]:
            raise ValueError(f"q {q.shape} does not fit cache {k_cache.shape}")
        out = aligned_empty((t_n, hq, d_n), np.float32)
        K.paged_attention(np.ascontiguousarray(q), k_cache, v_cache, _i32(meta.block_tables),
                          _i32(meta.seq_lens), _i32(meta.query_start_loc), np.float32(scale),
                          int(sliding_window), out)
        return out

    def copy_blocks(self, k_cache: Array, v_cache: Array, pairs: Array) -> None:
        """pairs [P, 2] of (src, dst) block ids: copy each src block to dst in both caches."""
        K.copy_blocks(k_cache, v_cache, _i32(pairs).reshape(-1, 2))

    def swap_blocks(self, src_k: Array, src_v: Array, dst_k: Array, dst_v: Array, pairs: Any) -> None:
        """pairs [P, 2] of (src, dst) block ids: dst_k[dst] = src_k[src] and the same for V."""
        pairs = check_swap(src_k, src_v, dst_k, dst_v, pairs)
        if len(pairs):
            dst_k[pairs[:, 1]] = src_k[pairs[:, 0]]
            dst_v[pairs[:, 1]] = src_v[pairs[:, 0]]

    # --- sampling ---------------------------------------------------------------------
    def sample(self, logits: Array, temperature: Array, top_k: Array, top_p: Array, uniform: Array) -> Array:
        """logits [S, V] -> new token ids [S] int32; the semantics of `Ops.sample` (cuda/sampling.cu),
        row by row in float64: a partition for top-k, a sort of the top-k survivors for top-p."""
        logits = np.asarray(logits)
        s_n, v_n = logits.shape
        temperature, top_p, uniform = (np.asarray(a, np.float32) for a in (temperature, top_p, uniform))
        top_k = np.asarray(top_k, _I32)
        if not (temperature > 0).any():  # all greedy (the decode common case): one vectorised argmax
            return np.argmax(np.where(np.isnan(logits), -np.inf, logits), axis=1).astype(_I32)
        out = np.empty(s_n, dtype=_I32)
        for b in range(s_n):
            row = logits[b].astype(np.float64)
            row[np.isnan(row)] = -np.inf
            best = int(np.argmax(row))  # ties: the lowest index
            t = float(temperature[b])
            if not t > 0.0 or row[best] == -np.inf:
                out[b] = best
                continue
            w = np.exp((row - row[best]) / t)   # [V] unnormalised probabilities
            keep = top_k_top_p_keep(row, w, int(top_k[b]), float(top_p[b]))
            cdf = np.cumsum(np.where(keep, w, 0.0))   # in index order, as the kernel walks
            hit = int(np.searchsorted(cdf, float(uniform[b]) * cdf[-1], side="right"))  # first cdf > target
            out[b] = hit if hit < v_n else int(np.flatnonzero(keep)[-1])
        return out
