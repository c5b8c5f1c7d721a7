"""EngineConfig: every engine knob in one validated dataclass."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cupaged.errors import InvalidRequestError
from cupaged.validation import check, is_bool, is_finite, is_int


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
    kv_cache_memory: int | None = None    # bytes for the KV pool; None: see kv_cache_fraction
    kv_cache_fraction: float | None = None  # share of this machine's RAM for the KV pool, in (0, 0.9]; if
                                          # neither is set: 0.1 of RAM on the CPU, profiled device memory
                                          # on CUDA (gpu_memory_utilization)
    gpu_memory_utilization: float = 0.9   # CUDA: share of device memory for weights, activations and KV
    enforce_eager: bool = False           # CUDA: never capture decode graphs
    seed: int | None = None               # for requests without their own seed
    enable_prefix_caching: bool = True    # reuse the K/V of full blocks whose prefix was seen before
    progress: bool = True                 # progress bars when fetching/converting weights
    preemption_mode: str = "recompute"    # "recompute" | "swap": what a preempted sequence's KV becomes
    swap_space: float = 4                 # GiB of host memory for swapped-out KV blocks (mode "swap"); 0: none

    def __post_init__(self) -> None:
        self._check_types()
        if self.backend not in ("auto", "cpu", "cuda"):
            raise InvalidRequestError(f"backend must be 'auto', 'cpu' or 'cuda', got {self.backend!r}")
        if self.block_size not in (8, 16, 32):
            raise InvalidRequestError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError(f"max_model_len must be at least 2 (a prompt token and a generated one), "
                                      f"got {self.max_model_len}; None means the model's own")
        self._check_kv_budget()
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise InvalidRequestError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float)) \
                or not math.isfinite(self.swap_space) or self.swap_space < 0:
            raise InvalidRequestError(f"swap_space must be a finite number of GiB >= 0, got {self.swap_space!r}")
        if self.preemption_mode == "swap" and self.swap_space_bytes() > 0.7 * physical_memory():
            raise InvalidRequestError(
                f"swap_space {self.swap_space} GiB is more than 70% of this machine's "
                f"{physical_memory() / 2**30:.1f} GiB of memory")

    def _check_types(self) -> None:
        ok = isinstance(self.model, (str, os.PathLike)) and str(self.model) != ""
        check("model", self.model, ok, "a model name from the catalog or a path (a non-empty str)")
        self.model = str(self.model)
        for name in ("backend", "dtype", "preemption_mode"):
            check(name, getattr(self, name), isinstance(getattr(self, name), str), "a str")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            check(name, getattr(self, name), is_int(getattr(self, name)), "an int")
        for name in ("max_model_len", "seed", "kv_cache_memory"):
            value = getattr(self, name)
            check(name, value, value is None or is_int(value), "an int or None")
        for name in ("enable_chunked_prefill", "enforce_eager", "enable_prefix_caching", "progress"):
            check(name, getattr(self, name), is_bool(getattr(self, name)), "a bool (True or False)")
        check("gpu_memory_utilization", self.gpu_memory_utilization, is_finite(self.gpu_memory_utilization),
              "a finite number")
        check("kv_cache_fraction", self.kv_cache_fraction,
              self.kv_cache_fraction is None or is_finite(self.kv_cache_fraction), "a finite number or None")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed!r}")

    def _check_kv_budget(self) -> None:
        """kv_cache_memory is bytes, kv_cache_fraction a share of RAM: one of them at most, and neither
        more than this machine has (the CPU pool lives in RAM; engine.py checks the device's)."""
        if self.kv_cache_memory is not None and self.kv_cache_fraction is not None:
            raise InvalidRequestError("give kv_cache_memory (bytes) or kv_cache_fraction (a share of RAM), not both")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise InvalidRequestError(f"kv_cache_memory is bytes and must be >= 1, got {self.kv_cache_memory} "
                                      f"(a share of RAM is kv_cache_fraction)")
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction <= 0.9:
            raise InvalidRequestError(f"kv_cache_fraction must be in (0, 0.9], got {self.kv_cache_fraction}")

    def kv_cache_bytes(self) -> int:
        """The KV budget: kv_cache_memory bytes, else kv_cache_fraction (default 0.1) of RAM."""
        if self.kv_cache_memory is not None:
            return int(self.kv_cache_memory)
        return int((0.1 if self.kv_cache_fraction is None else self.kv_cache_fraction) * physical_memory())

    def swap_space_bytes(self) -> int:
        """Host memory for the swap pool; 0 unless preemption_mode is "swap" (no pool is allocated then)."""
        return int(self.swap_space * 2**30) if self.preemption_mode == "swap" else 0


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
