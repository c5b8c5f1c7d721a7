"""Prefix-cache helpers: chained block hashes and hit counters (vLLM v1 style).

A full block of computed tokens is named by a hash of its parent block's hash and its own token
ids; the first block hashes the request's `cache_salt` instead of a parent. The hash of block i
therefore names the whole prefix tokens[:(i + 1) * block_size] (and the salt), which is what its
K/V depend on. Two requests share a block only if their hashes agree.

The hash is SHA-256 (truncated to 16 bytes), not Python's `hash`: prompts are user input, and a
non-cryptographic 64-bit hash can be collided on purpose, which would hand one request another's
K/V (a cross-tenant leak past `cache_salt`). All prefix-cache bookkeeping together, hashing
included, is 0.023% of a SmolLM2 run at a 0% hit rate on the 2-core EPYC (0.27 us per token,
benchmarks/prefix_caching.py; docs/results.md).
128 bits keep accidental collisions at ~n^2 / 2^129 for n cached blocks.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass

BlockHash = bytes
_DIGEST_BYTES = 16
_ROOT, _CHILD = b"\x00", b"\x01"  # domain tags: a first block can never hash like a later one


def hash_block(parent: BlockHash | None, token_ids: Seq[int], salt: str | None = None) -> BlockHash:
    """Hash of one full block: its parent's hash (None for the first block, which hashes the salt
    instead) and its token ids. Deterministic across processes."""
    if parent is None:
        salt_bytes = b"" if salt is None else salt.encode()
        h = hashlib.sha256(_ROOT + len(salt_bytes).to_bytes(8, "little") + salt_bytes)
        if salt is None:
            h.update(b"\xff")  # no salt differs from the empty salt
    else:
        h = hashlib.sha256(_CHILD + parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()[:_DIGEST_BYTES]


def extend_block_hashes(hashes: list[BlockHash], token_ids: Seq[int], block_size: int, num_blocks: int,
                        salt: str | None) -> list[BlockHash]:
    """Grow `hashes` (a sequence's chain, in place) to cover its first num_blocks full blocks."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt))
    return hashes


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix-cache counters in tokens, as vLLM counts them: `queries` are the tokens of every
    sequence looked up at admission (a resumed, preempted sequence counts again), `hits` the
    tokens whose K/V were reused instead of computed."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def __sub__(self, other: PrefixCacheStats) -> PrefixCacheStats:
        """The counts between two snapshots: `after - before`."""
        return PrefixCacheStats(self.queries - other.queries, self.hits - other.hits)
