"""EngineConfig: every engine knob in one validated dataclass."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cupaged.errors import InvalidRequestError


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    backend: str = "auto"                 # "auto" | "cpu" | "cuda"
    dtype: str = "auto"                   # CPU: float32
    block_size: int = 16                  # tokens per KV block
    max_num_seqs: int = 256               # sequences in one step
    max_num_batched_tokens: int = 2048    # tokens in one step; longer prompts are chunked
    enable_chunked_prefill: bool = True   # False: a prompt joins whole, in one (possibly long) step
    max_model_len: int | None = None      # default: the model's max_position_embeddings
    kv_cache_memory: float | None = None  # <= 1: fraction of RAM; > 1: bytes; None: 0.1 of RAM on the
                                          # CPU, profiled device memory on CUDA (gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9   # CUDA: share of device memory for weights, activations and KV
    enforce_eager: bool = False           # CUDA: never capture decode graphs
    seed: int | None = None               # for requests without their own seed
    enable_prefix_caching: bool = True    # reuse the K/V of full blocks whose prefix was seen before
    progress: bool = True                 # progress bars when fetching/converting weights
    preemption_mode: str = "recompute"    # "recompute" | "swap": what a preempted sequence's KV becomes
    swap_space: float = 4                 # GiB of host memory for swapped-out KV blocks (mode "swap"); 0: none

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "cpu", "cuda"):
            raise InvalidRequestError(f"backend must be 'auto', 'cpu' or 'cuda', got {self.backend!r}")
        if self.block_size not in (8, 16, 32):
            raise InvalidRequestError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise InvalidRequestError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise InvalidRequestError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float)) \
                or not math.isfinite(self.swap_space) or self.swap_space < 0:
            raise InvalidRequestError(f"swap_space must be a finite number of GiB >= 0, got {self.swap_space!r}")
        if self.preemption_mode == "swap" and self.swap_space_bytes() > 0.7 * _physical_memory():
            raise InvalidRequestError(
                f"swap_space {self.swap_space} GiB is more than 70% of this machine's "
                f"{_physical_memory() / 2**30:.1f} GiB of memory")

    def kv_cache_bytes(self) -> int:
        """The KV budget from kv_cache_memory (default: 0.1 of RAM)."""
        memory = 0.1 if self.kv_cache_memory is None else self.kv_cache_memory
        if memory <= 1:
            return int(memory * _physical_memory())
        return int(memory)

    def swap_space_bytes(self) -> int:
        """Host memory for the swap pool; 0 unless preemption_mode is "swap" (no pool is allocated then)."""
        return int(self.swap_space * 2**30) if self.preemption_mode == "swap" else 0


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
