"""BlockTables keeps one persistent row per running sequence; whatever happens to the sequences' tables
(appends, copy-on-write rewrites, preemption, newcomers past the row count), each step's gathered
table equals the tables built from scratch."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cupaged.engine.block_tables import BlockTables
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams


def reference(seqs, width):
    out = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s.block_table)] = s.block_table
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "rewrite", "reset", "new", "drop"]), st.integers(0, 50)),
                min_size=1, max_size=60))
def test_gathered_rows_equal_tables_built_from_scratch(ops):
    bt = BlockTables(rows=4, cols=2)  # small, so rows are reclaimed and the table grows
    live: list[Sequence] = []
    for op, k in ops:
        if op == "new" or not live:
            live.append(Sequence("r", [1], SamplingParams()))
        seq = live[k % len(live)]
        if op == "append":
            seq.block_table.extend(range(k, k + 1 + k % 3))  # in place, as append_slots does
        elif op == "rewrite" and seq.block_table:
            seq.block_table = seq.block_table.copy()  # as copy-on-write does
            seq.block_table[k % len(seq.block_table)] = 1000 + k
        elif op == "reset":
            seq.block_table = []
        elif op == "drop" and len(live) > 1:
            live.remove(seq)
        batch = live[k % 2::] or live  # not every live sequence runs every step
        rows = bt.rows_for(batch)
        assert len(set(rows.tolist())) == len(batch)
        width = max(1, max(len(s.block_table) for s in batch))
        np.testing.assert_array_equal(bt.gather(rows, width), reference(batch, width))
