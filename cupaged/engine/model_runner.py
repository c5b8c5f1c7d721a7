"""ModelRunner: ScheduledBatch -> step inputs (once per step, in NumPy) -> logits (on the backend).

It owns the KV cache: per layer a (K, V) pair of [num_blocks, block_size, Hk, D] arrays,
allocated once at start-up, and the swap pool: per layer a (K, V) pair of
[num_host_blocks, block_size, Hk, D] arrays in host memory (pinned on CUDA), empty unless
preemption_mode is "swap". Before each step it moves the blocks the scheduler asked for:
swap-outs first (their device blocks may be handed out again in this very step), then
swap-ins, then copy-on-write copies (whose source may have just been swapped in).
A step's metadata goes to the backend in one copy (`Ops.upload`), and decode steps replay
captured graphs where the backend has them (`cuda_graphs.DecodeGraphs`).
"""
from __future__ import annotations

import logging

import numpy as np

from cupaged.backend.ops import Array, AttnMetadata, Ops
from cupaged.engine.block_tables import BlockTables
from cupaged.engine.cuda_graphs import DecodeGraphs, StepInputs
from cupaged.engine.scheduler import ScheduledBatch
from cupaged.model.llama import LlamaModel
from cupaged.util import cdiv

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, ops: Ops, num_blocks: int, block_size: int, num_host_blocks: int = 0):
        cfg = model.cfg
        self.model, self.ops, self.block_size = model, ops, block_size
        self.dtype = ops.dtype  # the backend's compute dtype
        self.kv_caches = self.allocate_kv_caches(num_blocks)
        self.block_tables = BlockTables()
        self.graphs: DecodeGraphs | None = None
        logger.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                    2 * cfg.num_layers * self.kv_caches[0][0].nbytes / 2**20)
        host_shape = (num_host_blocks, *self.kv_caches[0][0].shape[1:])
        self.host_caches = [(ops.host_zeros(host_shape, self.dtype), ops.host_zeros(host_shape, self.dtype))
                            for _ in range(cfg.num_layers)] if num_host_blocks else []
        if num_host_blocks:
            logger.info("swap pool: %d host blocks, %.1f MiB", num_host_blocks,
                        2 * cfg.num_layers * self.host_caches[0][0].nbytes / 2**20)
        self.num_blocks_swapped_out = self.num_blocks_swapped_in = 0

    def allocate_kv_caches(self, num_blocks: int) -> list[tuple[Array, Array]]:
        cfg = self.model.cfg
        shape = (num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        return [(self.ops.zeros(shape, self.dtype), self.ops.zeros(shape, self.dtype)) for _ in range(cfg.num_layers)]

    def touch_kv_blocks(self, num_blocks: int) -> None:
        """Write zeros to the first num_blocks blocks of every layer's K and V (the ones a fresh block
        manager hands out first). On the CPU the pool's pages are mapped on first write, and a page
        fault costs ~1 ns a byte on the Intel VM of docs/results.md: 23 ms of a first 512-token
        prefill. A benchmark calls this to time a warm server, as llama.cpp clears its KV cache when it
        makes a context, before any timing."""
        # max(0, ...): a negative count touches nothing (k[:-1] would be all blocks but one)
        n = max(0, min(num_blocks, self.kv_caches[0][0].shape[0])) if self.kv_caches else 0
        for k, v in self.kv_caches:
            k[:n] = 0
            v[:n] = 0

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode graphs for batch sizes up to max_num_seqs (a no-op on backends without graphs)."""
        graphs = DecodeGraphs(self._forward, self.ops, max_num_seqs, max_model_len, self.block_size)
        self.graphs = graphs if graphs.graphs else None

    def run(self, batch: ScheduledBatch):
        """Compute the batch's tokens; return logits [S, V] for the sequences that sample, as a backend
        array in the compute dtype (the Sampler copies them to the host only when it needs to)."""
        self.move_blocks(batch)
        step = self.plan(batch)
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step)
        return self._forward(*self._upload(step))

    def _forward(self, input_ids: Array, meta: AttnMetadata) -> Array:
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
            pairs = self.ops.upload(np.array(batch.blocks_to_copy, dtype=np.int32))
            for k_cache, v_cache in self.kv_caches:
                self.ops.copy_blocks(k_cache, v_cache, pairs)

    def prepare(self, batch: ScheduledBatch) -> tuple[Array, AttnMetadata]:
        """The batch's input ids [T] and attention metadata, on the backend (one copy)."""
        return self._upload(self.plan(batch))

    def plan(self, batch: ScheduledBatch) -> StepInputs:
        """Pack the batch's new tokens and plan attention for every layer (host arrays). One Python pass
        over the sequences reads what only they know; the rest is vectorized NumPy."""
        bs, seqs = self.block_size, batch.seqs
        rows = self.block_tables.rows_for(seqs)
        starts = np.fromiter([s.num_computed_tokens for s in seqs], np.int64, len(seqs))
        counts = np.asarray(batch.num_tokens, dtype=np.int64)
        ends = starts + counts
        if counts.max() == 1:  # all decodes: one token each, the last one
            input_ids = np.fromiter([s.token_ids[-1] for s in seqs], np.int32, len(seqs))
        else:
            input_ids = np.fromiter((t for s, a, b in zip(seqs, starts.tolist(), ends.tolist())
                                     for t in s.token_ids[a:b]), np.int32, int(counts.sum()))
        qsl = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        seq_index = np.repeat(np.arange(len(seqs)), counts)
        positions = np.arange(len(input_ids), dtype=np.int64) + np.repeat(starts - qsl[:-1], counts)
        max_blocks = cdiv(int(ends.max()), bs)  # the blocks that hold a context (a table may hold no more)
        tables = self.block_tables.gather(rows, max_blocks)
        slots = tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        i32 = np.int32
        return StepInputs(input_ids, positions.astype(i32), slots.astype(i32), tables, ends.astype(i32), qsl,
                          (qsl[1:][list(batch.sample_rows)] - 1).astype(i32), int(counts.max()), int(ends.max()))

    def _upload(self, step: StepInputs) -> tuple[Array, AttnMetadata]:
        """All of a step's int32 metadata in ONE host->device copy, then split into views
        (each a contiguous slice of the one buffer, reshaped to its host shape)."""
        arrays = (step.input_ids, step.positions, step.slot_mapping, step.block_tables, step.seq_lens,
                  step.query_start_loc, step.logits_indices)
        flat = np.concatenate([a.ravel() for a in arrays])
        device = self.ops.upload(flat)
        ends = np.cumsum([a.size for a in arrays])
        ids, pos, slot, table, lens, starts_loc, logit_rows = [
            device[end - a.size:end].reshape(a.shape) for a, end in zip(arrays, ends)]
        meta = AttnMetadata(positions=pos, slot_mapping=slot, block_tables=table, seq_lens=lens,
                            query_start_loc=starts_loc, logits_indices=logit_rows,
                            max_query_len=step.max_query_len, max_seq_len=step.max_seq_len)
        return ids, meta


def profile_forward(model: LlamaModel, ops: Ops, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                    max_model_len: int) -> int:
    """Run the largest step the scheduler can form (max_num_batched_tokens prompt tokens over as many
    sequences as max_num_seqs allows, each sampling) on a scratch KV cache just big enough for it, so
    the backend can measure the activation peak. Returns the scratch cache's size in bytes."""
    from cupaged.engine.sequence import Sequence
    from cupaged.sampling_params import SamplingParams

    t = max_num_batched_tokens
    s = min(max(min(max_num_seqs, t), cdiv(t, max_model_len)), t)
    counts = [min(t // s + (i < t % s), max_model_len) for i in range(s)]
    seqs, next_block = [], 0
    for n in counts:
        seq = Sequence("profile", [0] * n, SamplingParams(max_tokens=1))
        blocks = cdiv(n, block_size)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seqs.append(seq)
    runner = ModelRunner(model, ops, next_block, block_size)
    logits = runner.run(ScheduledBatch(seqs, counts))
    ops.to_numpy(logits[:1, :1])  # wait for the step (a tiny copy)
    return 2 * len(runner.kv_caches) * runner.kv_caches[0][0].nbytes
