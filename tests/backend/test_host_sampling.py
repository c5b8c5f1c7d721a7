"""The one host top-k / top-p rule against a naive reference, on logits with many ties."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cupaged.backend.host_sampling import top_k_top_p_keep


def naive_keep(row, w, k, p):
    v = len(row)
    keep = [True] * v
    if 0 < k < v:
        kth = sorted(row, reverse=True)[k - 1]
        keep = [x >= kth for x in row]
    if p < 1.0:
        kept = sorted((i for i in range(v) if keep[i]), key=lambda i: -row[i])
        total = sum(w[i] for i in kept)
        mass, threshold = 0.0, row[kept[-1]]
        for i in kept:  # the token at which the mass reaches p * total: all its ties stay too
            mass += w[i]
            if mass >= p * total:
                threshold = row[i]
                break
        keep = [keep[i] and row[i] >= threshold for i in range(v)]
    return np.array(keep)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.integers(-1, 14),
       st.sampled_from([0.1, 0.5, 0.9, 1.0]), st.floats(0.3, 2.0))
def test_matches_the_naive_rule_with_ties(logits, k, p, t):
    row = np.array(logits, dtype=np.float64)
    w = np.exp((row - row.max()) / t)
    np.testing.assert_array_equal(top_k_top_p_keep(row, w, k, p), naive_keep(list(row), list(w), k, p))
