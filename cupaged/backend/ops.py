"""The backend seam: one abstract `Ops` class that the CPU and CUDA backends implement.

Every method has the same signature on every backend (a test enforces it). Arrays are
NumPy arrays on the CPU backend and CuPy arrays on the CUDA backend; the model code calls
only these ops plus array methods common to NumPy and CuPy.

Shapes use: T = tokens in this step, B = sequences in this step, H = hidden size,
Hq / Hk = query / KV heads, D = head_dim, I = MLP intermediate size,
NB = blocks in the pool, BS = block size, MB = max blocks per sequence.

KV cache layout, per layer and for K and V separately: [NB, BS, Hk, D]. A slot
(block_id * BS + offset) then addresses one contiguous [Hk, D] row, so the KV write is a
plain scatter by slot, and one block is one contiguous chunk (for copy and swap).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

Array = Any  # numpy.ndarray or cupy.ndarray


@dataclass
class AttnMetadata:
    """What every attention layer needs for one step, planned once per step.

    A sequence b schedules q_len_b = query_start_loc[b+1] - query_start_loc[b] new tokens.
    Its context after this step is seq_lens[b] tokens, so its new tokens sit at positions
    seq_lens[b] - q_len_b ... seq_lens[b] - 1. Each new token attends to every cached token
    of its sequence at a position <= its own (causal), optionally within a sliding window.
    K/V of the new tokens are written to the cache (write_kv) before attention reads it.
    """

    positions: Array        # [T] int32, absolute position of each new token
    slot_mapping: Array     # [T] int32, cache slot of each new token; < 0 means skip (padding)
    block_tables: Array     # [B, MB] int32, physical block ids; unused entries are -1
    seq_lens: Array         # [B] int32, context length including this step's tokens
    query_start_loc: Array  # [B + 1] int32, prefix sum of the new-token counts
    logits_indices: Array   # [S] int32, row of the last new token of each sequence that samples this step
    max_query_len: int
    max_seq_len: int


class Ops(ABC):
    """Compute ops shared by all backends. See the module docstring for shape letters."""

    name: str = "abstract"
    dtype: Any = None   # compute dtype token for asarray/zeros: weights, activations, KV cache
    itemsize: int = 0   # bytes per element of that dtype (sizes the KV pool)
    weight_dtype: Any = None  # dtype token of the weight matrices (linear layers, embeddings); None: dtype

    @property
    def dtype_name(self) -> str:
        """'float32', 'float16' or 'bfloat16': what the CLI tells the user it computes in."""
        import numpy as np
        return self.dtype if isinstance(self.dtype, str) else np.dtype(self.dtype).name

    # --- arrays -----------------------------------------------------------------------
    @abstractmethod
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """Copy/convert host data into a backend array."""

    @abstractmethod
    def to_numpy(self, x: Array) -> Any:
        """Return the array as a host numpy.ndarray."""

    @abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        """A zero-filled backend array (the KV cache is allocated with this once)."""

    @abstractmethod
    def host_zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero-filled numpy.ndarray in host memory that `swap_blocks` moves blocks to and from (the
        swap pool is allocated with this once). Page-locked (pinned) on CUDA, so copies run asynchronously."""

    @abstractmethod
    def upload(self, host: Any, out: Array | None = None) -> Array:
        """One host -> backend copy of the NumPy array `host` (a step's packed metadata): into `out`
        (a backend array of the same dtype and size) when given, else into a new array. On CUDA the
        copy goes through pinned staging and is asynchronous on the current stream."""

    def take_rows(self, x: Array, rows: Any) -> Array:
        """x[rows] for host row indices `rows` (one small upload of the indices): x [N, ...] -> [len(rows), ...]."""
        import numpy as np
        return x[self.upload(np.asarray(rows, dtype=np.int32))]

    # --- whole-step services ----------------------------------------------------------
    @abstractmethod
    def capture_graph(self, fn: Callable[[], Array]) -> Any:
        """Capture fn (a forward on persistent buffers) as a graph whose `replay()` reruns it and returns
        the array fn returned; None when the backend has no graphs (then the step runs eagerly)."""

    @abstractmethod
    def profile_kv_budget(self, run_profile: Callable[[], int], utilization: float) -> int | None:
        """Bytes the KV pool may take when `utilization` of the device's memory goes to weights,
        activations and KV blocks: measured around `run_profile` (one forward at the largest step,
        returning the bytes of any scratch KV cache it allocated). None where the pool is sized from
        host RAM instead (the CPU backend)."""

    # --- dense layers -----------------------------------------------------------------
    @abstractmethod
    def embedding(self, ids: Array, table: Array) -> Array:
        """ids [T] int32, table [V, H] -> [T, H]."""

    @abstractmethod
    def linear(self, x: Array, weight: Array, bias: Array | None = None) -> Array:
        """x [T, K], weight [N, K] (row-major, as stored), bias [N] or None -> x @ weight.T + bias, [T, N]."""

    @abstractmethod
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """x [T, H], weight [H] -> x / rms(x) * weight, [T, H] (new array)."""

    @abstractmethod
    def fused_add_rms_norm(self, x: Array, residual: Array, weight: Array, eps: float) -> Array:
        """residual += x (in place, [T, H]); returns rms_norm(residual) as a new [T, H] array."""

    @abstractmethod
    def rotary_embedding(self, positions: Array, q: Array, k: Array, cos_sin_cache: Array, is_neox: bool) -> None:
        """In place on q [T, Hq, D] and k [T, Hk, D]. cos_sin_cache [max_pos, rot_dim]: the first
        rot_dim/2 columns are cos, the rest sin. Only the first rot_dim features of each head rotate.
        NeoX style pairs feature i with i + rot_dim/2; GPT-J style pairs 2i with 2i+1."""

    @abstractmethod
    def silu_and_mul(self, x: Array) -> Array:
        """x [T, 2I] = [gate | up] -> silu(gate) * up, [T, I]."""

    # --- paged KV cache ---------------------------------------------------------------
    @abstractmethod
    def write_kv(self, k: Array, v: Array, k_cache: Array, v_cache: Array, slot_mapping: Array) -> None:
        """k, v [T, Hk, D] go into k_cache, v_cache [NB, BS, Hk, D] at slot_mapping [T]; slot < 0 is skipped."""

    @abstractmethod
    def paged_attention(self, q: Array, k_cache: Array, v_cache: Array, meta: AttnMetadata,
                        scale: float, sliding_window: int = 0) -> Array:
        """q [T, Hq, D] -> out [T, Hq, D]. Query head h reads KV head h // (Hq // Hk).
        One op for prefill chunks and decodes; see AttnMetadata for the causal rule.
        sliding_window > 0 limits each query to the last `sliding_window` positions (itself included)."""

    @abstractmethod
    def copy_blocks(self, k_cache: Array, v_cache: Array, pairs: Array) -> None:
        """pairs [P, 2] int32 of (src, dst) block ids: copy block src to block dst in both caches."""

    @abstractmethod
    def swap_blocks(self, src_k: Array, src_v: Array, dst_k: Array, dst_v: Array, pairs: Any) -> None:
        """pairs [P, 2] int of (src, dst) block ids, a host (NumPy) array: copy block src of src_k, src_v to
        block dst of dst_k, dst_v. One side is a KV cache [NB, BS, Hk, D], the other a host pool
        [NH, BS, Hk, D] from host_zeros (device -> host swaps out, host -> device swaps in). No dst may
        repeat. On CUDA the copies are asynchronous: ordered after the work already queued on the current
        stream, and before the work queued on it next."""

    # --- sampling ---------------------------------------------------------------------
    @abstractmethod
    def sample(self, logits: Array, temperature: Array, top_k: Array, top_p: Array, uniform: Array) -> Array:
        """Next tokens, one per row: logits [S, V] (compute dtype or float32), temperature [S] float32,
        top_k [S] int32 (<= 0 or >= V: off), top_p [S] float32 (>= 1: off), uniform [S] float32 in
        [0, 1) -> token ids [S] int32, a backend array. The per-row parameters are host (NumPy)
        arrays or backend arrays.

        Row b is greedy (the argmax, ties to the lowest index, NaN as -inf) when temperature[b] <= 0.
        Otherwise the allowed set is the top-k largest logits (all ties at the k-th kept), then of
        those the smallest set of largest logits whose softmax(logits / T) mass reaches
        top_p * mass(top-k set) (ties at the threshold kept); the token is the first allowed index,
        in index order, whose cumulative mass exceeds uniform[b] * mass(allowed). cuda/sampling.cu
        is the specification."""


def block_runs(pairs: Any) -> list[tuple[int, int, int]]:
    """pairs [P, 2] (src, dst) block ids -> (src, dst, n) runs: blocks src .. src+n-1 go to dst .. dst+n-1.
    Pairs are sorted by src first, so a run of consecutive ids is found in any order."""
    import numpy as np

    if len(pairs) == 0:
        return []
    p = pairs[np.argsort(pairs[:, 0], kind="stable")]
    step = np.diff(p, axis=0)                                      # [P-1, 2]
    starts = np.r_[0, np.flatnonzero((step != 1).any(axis=1)) + 1]
    lengths = np.diff(np.r_[starts, len(p)])
    return [(int(p[i, 0]), int(p[i, 1]), int(n)) for i, n in zip(starts, lengths)]


def check_swap(src_k: Array, src_v: Array, dst_k: Array, dst_v: Array, pairs: Any):
    """Check a `swap_blocks` call: shapes and dtypes of the four pools, and the block ids of `pairs`
    (host data, so checking its values costs no device sync). Returns pairs as an int64 [P, 2] ndarray."""
    import numpy as np

    for what, a, b in (("src", src_k, src_v), ("dst", dst_k, dst_v)):
        if a.ndim != 4 or a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"swap_blocks: {what} K {a.shape} {a.dtype} and V {b.shape} {b.dtype} must be "
                             f"equal [blocks, block_size, Hk, D] arrays")
    if src_k.shape[1:] != dst_k.shape[1:] or src_k.dtype != dst_k.dtype:
        raise ValueError(f"swap_blocks: src blocks {src_k.shape[1:]} {src_k.dtype} differ from dst blocks "
                         f"{dst_k.shape[1:]} {dst_k.dtype}")
    if not isinstance(pairs, (np.ndarray, list, tuple)):
        raise TypeError(f"swap_blocks: pairs must be host data (a NumPy array or a list), got {type(pairs).__name__}")
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.size == 0:
        pairs = pairs.reshape(0, 2)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"swap_blocks: pairs must be [P, 2] (src, dst) block ids, got shape {pairs.shape}")
    for col, what, n in ((0, "src", src_k.shape[0]), (1, "dst", dst_k.shape[0])):
        bad = pairs[(pairs[:, col] < 0) | (pairs[:, col] >= n), col]
        if bad.size:
            raise ValueError(f"swap_blocks: {what} block {int(bad[0])} is outside [0, {n})")
    if len(np.unique(pairs[:, 1])) != len(pairs):
        raise ValueError(f"swap_blocks: a dst block repeats in {pairs[:, 1].tolist()}")
    return pairs
