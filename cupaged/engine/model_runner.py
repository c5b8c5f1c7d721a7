"""ModelRunner: ScheduledBatch -> AttnMetadata (once per step, in NumPy) -> logits (on the backend).

It owns the KV cache: per layer a (K, V) pair of [num_blocks, block_size, Hk, D] arrays,
allocated once at start-up, and the swap pool: per layer a (K, V) pair of
[num_host_blocks, block_size, Hk, D] arrays in host memory (pinned on CUDA), empty unless
preemption_mode is "swap". Before each step it moves the blocks the scheduler asked for:
swap-outs first (their device blocks may be handed out again in this very step), then
swap-ins, then copy-on-write copies (whose source may have just been swapped in).
"""
from __future__ import annotations

import logging

import numpy as np

from cupaged.backend.ops import AttnMetadata, Ops
from cupaged.engine.scheduler import ScheduledBatch
from cupaged.model.llama import LlamaModel

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, ops: Ops, num_blocks: int, block_size: int, dtype=None,
                 num_host_blocks: int = 0):
        cfg = model.cfg
        self.model, self.ops, self.block_size = model, ops, block_size
        dtype = ops.dtype if dtype is None else dtype  # the backend's compute dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(ops.zeros(shape, dtype), ops.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
        logger.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                    2 * cfg.num_layers * self.kv_caches[0][0].nbytes / 2**20)
        host_shape = (num_host_blocks, *shape[1:])
        self.host_caches = [(ops.host_zeros(host_shape, dtype), ops.host_zeros(host_shape, dtype))
                            for _ in range(cfg.num_layers)] if num_host_blocks else []
        if num_host_blocks:
            logger.info("swap pool: %d host blocks, %.1f MiB", num_host_blocks,
                        2 * cfg.num_layers * self.host_caches[0][0].nbytes / 2**20)
        self.num_blocks_swapped_out = self.num_blocks_swapped_in = 0

    def run(self, batch: ScheduledBatch):
        """Compute the batch's tokens; return logits [S, V] for the sequences that sample, as a backend
        array in the compute dtype (the Sampler copies them to the host only when it needs to)."""
        self.move_blocks(batch)
        input_ids, meta = self.prepare(batch)
        return self.model.forward(input_ids, meta, self.kv_caches)

    def move_blocks(self, batch: ScheduledBatch) -> None:
        """Swap-outs, then swap-ins, then copy-on-write copies, in every layer."""
        if batch.blocks_to_swap_out:
            pairs = np.array(batch.blocks_to_swap_out, dtype=np.int32)  # [P, 2] (device, host), on the host
            for (k_cache, v_cache), (k_host, v_host) in zip(self.kv_caches, self.host_caches, strict=True):
                self.ops.swap_blocks(k_cache, v_cache, k_host, v_host, pairs)
            self.num_blocks_swapped_out += len(pairs)
        if batch.blocks_to_swap_in:
            pairs = np.array(batch.blocks_to_swap_in, dtype=np.int32)  # [P, 2] (host, device), on the host
            for (k_cache, v_cache), (k_host, v_host) in zip(self.kv_caches, self.host_caches, strict=True):
                self.ops.swap_blocks(k_host, v_host, k_cache, v_cache, pairs)
            self.num_blocks_swapped_in += len(pairs)
        if batch.blocks_to_copy:
            pairs = self.ops.asarray(np.array(batch.blocks_to_copy, dtype=np.int32))
            for k_cache, v_cache in self.kv_caches:
                self.ops.copy_blocks(k_cache, v_cache, pairs)

    def prepare(self, batch: ScheduledBatch) -> tuple[object, AttnMetadata]:
        """Pack the batch's new tokens and plan attention for every layer."""
        bs = self.block_size
        starts = np.array([s.num_computed_tokens for s in batch.seqs], dtype=np.int64)
        counts = np.array(batch.num_tokens, dtype=np.int64)
        ends = starts + counts
        input_ids = np.concatenate([s.token_ids[a:b] for s, a, b in zip(batch.seqs, starts, ends)]).astype(np.int32)
        positions = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = np.full((len(batch.seqs), max_blocks), -1, dtype=np.int32)
        for row, seq in enumerate(batch.seqs):
            tables[row, :len(seq.block_table)] = seq.block_table
        seq_index = np.repeat(np.arange(len(batch.seqs)), counts)
        slots = tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        qsl = np.zeros(len(batch.seqs) + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        sampled = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        ids, pos, slot, table, lens, starts_loc, logit_rows = self._upload(
            input_ids, positions, slots, tables, ends, qsl, qsl[1:][sampled] - 1)
        meta = AttnMetadata(positions=pos, slot_mapping=slot, block_tables=table, seq_lens=lens,
                            query_start_loc=starts_loc, logits_indices=logit_rows,
                            max_query_len=int(counts.max()), max_seq_len=int(ends.max()))
        return ids, meta

    def _upload(self, *arrays: np.ndarray) -> list:
        """All of a step's int32 metadata in ONE host->device copy, then split into views
        (each a contiguous slice of the one buffer, reshaped to its host shape)."""
        flat = np.concatenate([np.asarray(a, dtype=np.int32).ravel() for a in arrays])
        device = self.ops.asarray(flat)
        ends = np.cumsum([a.size for a in arrays])
        return [device[end - a.size:end].reshape(a.shape) for a, end in zip(arrays, ends)]
