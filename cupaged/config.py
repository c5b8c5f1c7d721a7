"""EngineConfig: every engine knob in one validated dataclass."""
from __future__ import annotations

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
    max_model_len: int | None = None      # default: the model's max_position_embeddings
    kv_cache_memory: float = 0.1          # <= 1: fraction of RAM; > 1: bytes
    seed: int | None = None               # for requests without their own seed
    enable_prefix_caching: bool = True    # reuse the K/V of full blocks whose prefix was seen before
    progress: bool = True                 # progress bars when fetching/converting weights

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "cpu", "cuda"):
            raise InvalidRequestError(f"backend must be 'auto', 'cpu' or 'cuda', got {self.backend!r}")
        if self.block_size not in (8, 16, 32):
            raise InvalidRequestError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.kv_cache_memory <= 0:
            raise InvalidRequestError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")

    def kv_cache_bytes(self) -> int:
        if self.kv_cache_memory <= 1:
            return int(self.kv_cache_memory * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return int(self.kv_cache_memory)
