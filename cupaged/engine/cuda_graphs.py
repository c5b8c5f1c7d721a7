"""Decode steps as captured graphs: one per padded batch size, replayed on persistent buffers.

On a GPU a small model's decode step is bound by launch overhead (a dozen launches per layer), so
when the backend can capture (`Ops.capture_graph`), the runner captures the whole forward once per
batch size 1, 2, 4, 8, 16, ... up to max_num_seqs, at start-up. Every graph reads its inputs from
one persistent int32 buffer and writes its logits into an array it owns. A step of B decodes fills
the buffer (one host -> device copy), is padded to the next captured size P and replays that graph.
Padding rows b >= B: input id 0, position 0, slot -1 (nothing is written), seq_len 0 (attention reads
nothing and writes zeros); their logits rows are never read.

What a graph bakes in must not depend on the step: the attention's partition count comes from
max_seq_len, so graphs are captured with max_seq_len = max_model_len (partitions past a sequence's
own length exit at once), and block tables are [P, MB] with MB = ceil(max_model_len / block_size).

The persistent buffer, segment by segment (int32), each sized for the largest graph Pmax:
    input_ids [Pmax] | positions [Pmax] | slot_mapping [Pmax] | seq_lens [Pmax] |
    logits_indices [Pmax] | query_start_loc [Pmax + 1] | block_tables [Pmax, MB]
A graph of size P reads the first P (P + 1; P rows) of each segment, so a step uploads only the
buffer's prefix up to its P rows of block tables.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from cupaged.backend.ops import Array, AttnMetadata, Ops
from cupaged.util import cdiv

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... below max_num_seqs, then max_num_seqs itself."""
    sizes, p = [], 1
    while p < max_num_seqs:
        sizes.append(p)
        p *= 2
    return sizes + [max_num_seqs]


@dataclass
class StepInputs:
    """One step's inputs on the host, as ModelRunner.prepare builds them (all int32)."""

    input_ids: np.ndarray       # [T]
    positions: np.ndarray       # [T]
    slot_mapping: np.ndarray    # [T]
    block_tables: np.ndarray    # [B, MB]
    seq_lens: np.ndarray        # [B]
    query_start_loc: np.ndarray  # [B + 1]
    logits_indices: np.ndarray  # [S]
    max_query_len: int
    max_seq_len: int


class DecodeGraphs:
    """Captured decode forwards. `fits(step)` says whether a step can replay one; `run(step)` does it."""

    def __init__(self, forward, ops: Ops, max_num_seqs: int, max_model_len: int, block_size: int):
        """forward(input_ids, meta) -> logits: the model's forward over the runner's KV caches."""
        self.ops, self.max_model_len = ops, max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        pmax, self.mb = self.sizes[-1], cdiv(max_model_len, block_size)
        names = ("input_ids", "positions", "slot_mapping", "seq_lens", "logits_indices", "query_start_loc",
                 "block_tables")
        lengths = (pmax,) * 5 + (pmax + 1, pmax * self.mb)
        ends = np.cumsum(lengths)
        self.segments = {n: (int(e - n_), int(e)) for n, n_, e in zip(names, lengths, ends)}
        self.host = np.zeros(int(ends[-1]), dtype=np.int32)   # staging of the persistent buffer
        self.static = ops.upload(self.host)                    # the persistent buffer [sum of segments]
        self.graphs: dict[int, object] = {}
        self._capture_all(forward)

    # --- capture ----------------------------------------------------------------------------
    def _views(self, size: int) -> tuple[Array, AttnMetadata]:
        """The first `size` rows of every segment of the persistent buffer, as one step's inputs."""
        def seg(name: str, n: int) -> Array:
            lo, _ = self.segments[name]
            return self.static[lo:lo + n]

        meta = AttnMetadata(positions=seg("positions", size), slot_mapping=seg("slot_mapping", size),
                            block_tables=seg("block_tables", size * self.mb).reshape(size, self.mb),
                            seq_lens=seg("seq_lens", size), query_start_loc=seg("query_start_loc", size + 1),
                            logits_indices=seg("logits_indices", size), max_query_len=1,
                            max_seq_len=self.max_model_len)
        return seg("input_ids", size), meta

    def _capture_all(self, forward) -> None:
        start = time.perf_counter()
        self._fill(None, self.sizes[-1])  # an all-padding step: captures write no KV and read none
        self.ops.upload(self.host, out=self.static)
        for size in reversed(self.sizes):  # largest first, as the graph memory pool then only shrinks
            ids, meta = self._views(size)
            try:
                graph = self.ops.capture_graph(lambda ids=ids, meta=meta: forward(ids, meta))
            except MemoryError as e:  # CuPy's OutOfMemoryError: the KV pool left too little room
                logger.warning("not enough device memory to capture the decode graph of batch %d (%s): decode "
                               "steps run eagerly; lower gpu_memory_utilization to keep graphs", size, e)
                self.graphs.clear()
                return
            if graph is None:
                logger.info("the %s backend cannot capture graphs: decode steps run eagerly", self.ops.name)
                self.graphs.clear()
                return
            self.graphs[size] = graph
        pool = getattr(getattr(self.ops, "device", None), "graph_pool_bytes", 0)
        logger.info("captured %d decode graphs (batch sizes %s) in %.2f s%s", len(self.graphs),
                    ", ".join(map(str, self.sizes)), time.perf_counter() - start,
                    f", graph memory pool {pool / 2**20:.1f} MiB" if pool else "")

    # --- replay -----------------------------------------------------------------------------
    def fits(self, step: StepInputs) -> bool:
        b = step.seq_lens.shape[0]
        return (bool(self.graphs) and step.max_query_len == 1 and b <= self.sizes[-1]
                and step.input_ids.shape[0] == b and step.block_tables.shape[1] <= self.mb)

    def run(self, step: StepInputs) -> Array:
        """Replay the graph of the smallest captured size >= B; returns logits [B, V] (a view of the
        graph's output, valid until the next replay)."""
        b = step.seq_lens.shape[0]
        size = next(s for s in self.sizes if s >= b)
        self._fill(step, size)
        n = self.segments["block_tables"][0] + size * self.mb  # block tables come last: a prefix holds it all
        self.ops.upload(self.host[:n], out=self.static[:n])
        logits = self.graphs[size].replay()
        rows = step.logits_indices
        if rows.shape[0] == b and (rows == np.arange(b)).all():  # every sequence samples: the usual case
            return logits[:b]
        return self.ops.take_rows(logits, rows)  # a 1-token prefill chunk that does not sample yet

    def _fill(self, step: StepInputs | None, size: int) -> None:
        """Write the step's rows, then padding up to `size`, into the host staging buffer."""
        b = 0 if step is None else step.seq_lens.shape[0]

        def put(name: str, rows: np.ndarray | None, pad: int, n: int) -> None:
            lo, _ = self.segments[name]
            k = 0 if rows is None else rows.size
            if k:
                self.host[lo:lo + k] = rows.ravel()
            self.host[lo + k:lo + n] = pad

        put("input_ids", None if step is None else step.input_ids, 0, size)
        put("positions", None if step is None else step.positions, 0, size)
        put("slot_mapping", None if step is None else step.slot_mapping, -1, size)
        put("seq_lens", None if step is None else step.seq_lens, 0, size)
        lo, _ = self.segments["logits_indices"]
        self.host[lo:lo + size] = np.arange(size, dtype=np.int32)
        lo, _ = self.segments["query_start_loc"]
        self.host[lo:lo + size + 1] = np.arange(size + 1, dtype=np.int32)
        lo, _ = self.segments["block_tables"]
        tables = self.host[lo:lo + size * self.mb].reshape(size, self.mb)
        tables[:] = -1
        if step is not None:
            tables[:b, :step.block_tables.shape[1]] = step.block_tables
