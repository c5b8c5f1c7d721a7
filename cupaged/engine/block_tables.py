"""Block tables kept across steps: one persistent int32 row per running sequence.

A sequence keeps its row for as long as it runs; each step only the blocks it gained since the last
step are written (block tables are append-only while the list object stays the same). The block
manager gives a sequence a new list whenever it rewrites one instead of appending (copy-on-write,
preemption, swap, fork), so a changed identity means the row is rewritten. Rows of sequences that
left are reclaimed when a newcomer finds no free row. A step then gathers its rows with one NumPy
take instead of building a table in Python.
"""
from __future__ import annotations

import numpy as np

from cupaged.engine.sequence import Sequence


class BlockTables:
    def __init__(self, rows: int = 64, cols: int = 64):
        self.table = np.full((rows, cols), -1, dtype=np.int32)  # [rows, max blocks per sequence so far]
        # seq_id -> [row, the block_table list the row mirrors, entries written]
        self._held: dict[int, list] = {}
        self._free = list(range(rows - 1, -1, -1))

    def rows_for(self, seqs: list[Sequence]) -> np.ndarray:
        """Bring the rows of seqs up to date; returns their indices [B] int64."""
        held = self._held
        stale = [seq for seq in seqs if (entry := held.get(seq.seq_id)) is None
                 or entry[1] is not seq.block_table or entry[2] != len(seq.block_table)]
        for seq in stale:  # new here, a new list (rewrite the row), or blocks added (write those)
            entry = held.get(seq.seq_id) or self._assign(seq, seqs)
            table = seq.block_table
            self._write(entry, table, entry[2] if entry[1] is table and entry[2] < len(table) else 0)
        return np.fromiter([held[seq.seq_id][0] for seq in seqs], np.int64, len(seqs))

    def gather(self, rows: np.ndarray, max_blocks: int) -> np.ndarray:
        """The step's block tables [B, max_blocks] int32 (unused entries -1)."""
        return self.table[rows, :max_blocks]

    def _write(self, entry: list, table: list[int], start: int) -> None:
        if len(table) > self.table.shape[1]:
            grown = np.full((self.table.shape[0], max(len(table), 2 * self.table.shape[1])), -1, np.int32)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        row = entry[0]
        self.table[row, start:len(table)] = table[start:]
        if start == 0:
            self.table[row, len(table):] = -1
        entry[1], entry[2] = table, len(table)

    def _assign(self, seq: Sequence, batch: list[Sequence]) -> list:
        if not self._free:
            self._reclaim(batch)
        row = self._free.pop()
        entry = self._held[seq.seq_id] = [row, seq.block_table, 0]
        self.table[row] = -1
        return entry

    def _reclaim(self, batch: list[Sequence]) -> None:
        """Free the rows of sequences not in this step; grow the table if every row is in use."""
        keep = {seq.seq_id for seq in batch}
        for seq_id in [s for s in self._held if s not in keep]:
            self._free.append(self._held.pop(seq_id)[0])
        if not self._free:
            n = self.table.shape[0]
            self.table = np.concatenate([self.table, np.full_like(self.table, -1)])
            self._free = list(range(2 * n - 1, n - 1, -1))
