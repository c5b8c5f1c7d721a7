"""Logits -> next tokens: on the backend (`Ops.sample`) when it can, else on the host in NumPy.

Order, as in vLLM: penalties (repetition, presence, frequency) -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> draw with the sequence's own generator. A seeded
sequence draws from its own `numpy.random.Generator`, so its output does not depend on
what else is in the batch. Log-probabilities are those of the model's raw distribution.

The fast path: when no sequence of the step needs penalties, min-p or log-probabilities,
each sampling sequence draws one uniform from its generator on the host, and `ops.sample`
picks every token where the logits are (greedy, temperature, top-k, top-p): only the int32
token ids come back to the host. Otherwise the logits are copied to the host (float32) and
the NumPy path below runs. Both draw from the same distribution, but not the same token for
a given seed (one inverse-CDF uniform against `Generator.choice`).
"""
from __future__ import annotations

import numpy as np

from cupaged.backend.host_sampling import top_k_top_p_keep
from cupaged.backend.ops import Ops
from cupaged.engine.sequence import Sequence


class Sampler:
    """ops: the backend whose `sample` serves the fast path; None keeps every step on the host
    (logits must then be host arrays)."""

    def __init__(self, seed: int | None = None, ops: Ops | None = None):
        self._rng = np.random.default_rng(seed)
        self._seq_rngs: dict[int, np.random.Generator] = {}
        # seq_id -> [uniforms drawn ahead from its own generator, how many are used]: the same values as
        # one draw per step, without a Generator call per sequence per step
        self._ahead: dict[int, list] = {}
        self.ops = ops
        self._rows_key: list[int] | None = None  # the sequences (ids, in order) the last step sampled
        self._on_host: list[int] = []             # which of them need the host path
        self._rows_value: tuple | None = None     # their packed per-row parameters (_rows)

    def sample(self, logits, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [B, V] (a backend array, or a host array), one row per sequence ->
        (token ids [B], logprobs per row or None)."""
        if self.ops is None:
            return self.sample_on_host(np.asarray(logits, dtype=np.float32), seqs)
        on_host = self._host_rows(seqs)
        if not on_host:
            return self.sample_on_device(logits, seqs), [None] * len(seqs)
        if len(on_host) == len(seqs):
            return self.sample_on_host(np.asarray(self.ops.to_numpy(logits), dtype=np.float32), seqs)
        # A mixed batch: each row takes its own path, so a seeded request draws the same tokens
        # whatever else is in the batch.
        host_set = set(on_host)
        on_device = [i for i in range(len(seqs)) if i not in host_set]
        tokens: list[int] = [0] * len(seqs)
        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        device_tokens = self.sample_on_device(self.ops.take_rows(logits, on_device), [seqs[i] for i in on_device])
        host_rows = np.asarray(self.ops.to_numpy(self.ops.take_rows(logits, on_host)), dtype=np.float32)
        host_tokens, host_logprobs = self.sample_on_host(host_rows, [seqs[i] for i in on_host])
        for i, token in zip(on_device, device_tokens):
            tokens[i] = token
        for i, token, lp in zip(on_host, host_tokens, host_logprobs):
            tokens[i], logprobs[i] = token, lp
        return tokens, logprobs

    def _host_rows(self, seqs: list[Sequence]) -> list[int]:
        """The rows that need the host path. What follows is kept from the last step while the same
        sequences sample in the same order (a steady decode)."""
        key = [seq.seq_id for seq in seqs]
        if key != self._rows_key:
            self._rows_key, self._rows_value = key, None
            self._on_host = [i for i, seq in enumerate(seqs) if seq.params.packed[3]]
        return self._on_host

    def sample_on_device(self, logits, seqs: list[Sequence]) -> list[int]:
        """The fast path: per-row parameters (packed once per request, `SamplingParams.packed`) and
        uniforms from the host, `ops.sample` on the backend, one device -> host copy of the token ids."""
        n = len(seqs)
        temperature, top_p, top_k, shared, seeded = self._rows(seqs)
        if shared.size or seeded:  # some row draws: its parameters go to the backend in one copy
            uniform = np.zeros(n, np.float32)
            uniform[shared] = self._rng.random(shared.size, dtype=np.float32)  # in [0, 1)
            if seeded:
                uniform[seeded] = [self._next_uniform(seqs[i]) for i in seeded]
            temperature, top_k, top_p, uniform = self._upload_params(temperature, top_k, top_p, uniform)
        else:
            uniform = np.zeros(n, np.float32)
        tokens = self.ops.sample(logits, temperature, top_k, top_p, uniform)
        return np.asarray(self.ops.to_numpy(tokens)).tolist()

    def _rows(self, seqs: list[Sequence]) -> tuple:
        """Per-row (temperature, top_p, top_k) [S] from the requests' packed parameters, the rows that
        draw from the shared generator and those with a seed of their own, kept while they stay the same."""
        if self._host_rows(seqs) is self._on_host and self._rows_value is not None:
            return self._rows_value
        packed = np.array([seq.params.packed for seq in seqs], dtype=np.float64).reshape(len(seqs), 5)
        draws = packed[:, 0] > 0
        temperature = packed[:, 0].astype(np.float32)
        top_p = np.where(draws, packed[:, 1], 1.0).astype(np.float32)
        top_k = np.where(draws, packed[:, 2], -1).astype(np.int32)
        seeded = np.flatnonzero(draws & (packed[:, 4] > 0)).tolist()
        shared = np.flatnonzero(draws & (packed[:, 4] == 0))
        self._rows_value = (temperature, top_p, top_k, shared, seeded)
        return self._rows_value

    def _upload_params(self, temperature, top_k, top_p, uniform) -> list:
        """The four per-row parameter arrays [S] packed into one [4, S] float32 buffer (top_k as its
        int32 bits), one `ops.upload`, and split back into views."""
        packed = np.stack([temperature, top_p, uniform, top_k.view(np.float32)])
        dev = self.ops.upload(packed)
        return [dev[0], dev[3].view(np.int32), dev[1], dev[2]]

    def sample_on_host(self, logits: np.ndarray,
                       seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [B, V] float32 on the host: penalties, filters and the draw in NumPy."""
        processed = logits.copy()
        tokens, logprobs = [], []
        for row, seq in enumerate(seqs):
            p = seq.params
            self._apply_penalties(processed[row], seq)
            if p.greedy:
                token = int(np.argmax(processed[row]))
            else:
                token = self._draw(processed[row], seq)
            tokens.append(token)
            logprobs.append(top_logprobs(logits[row], token, p.logprobs) if p.logprobs is not None else None)
        return tokens, logprobs

    def forget(self, seq: Sequence) -> None:
        self._seq_rngs.pop(seq.seq_id, None)
        self._ahead.pop(seq.seq_id, None)

    AHEAD = 64  # uniforms a seeded sequence draws at once (Generator.random(n) gives the n values that n
    #             calls of Generator.random() would)

    def _next_uniform(self, seq: Sequence) -> float:
        """The next float32 uniform in [0, 1) of a seeded sequence's own generator."""
        ahead = self._ahead.get(seq.seq_id)
        if ahead is None or ahead[1] == self.AHEAD:
            ahead = self._ahead[seq.seq_id] = [self._rng_for(seq).random(self.AHEAD, dtype=np.float32).tolist(), 0]
        ahead[1] += 1
        return ahead[0][ahead[1] - 1]

    # --- steps ----------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(row: np.ndarray, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(seq.token_ids, dtype=np.int64))
            vals = row[seen]
            row[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            ids, counts = np.unique(np.asarray(seq.output_token_ids, dtype=np.int64), return_counts=True)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty

    def _draw(self, row: np.ndarray, seq: Sequence) -> int:
        p = seq.params
        row = row.astype(np.float64) / p.temperature
        row[np.isnan(row)] = -np.inf
        probs = _softmax(row)
        probs[~top_k_top_p_keep(row, probs, p.top_k, p.top_p)] = 0.0  # the kernel's rule, ties kept
        if p.min_p > 0.0:
            probs[probs < p.min_p * probs.max()] = 0.0
        probs /= probs.sum()
        return int(self._rng_for(seq).choice(probs.size, p=probs))

    def _rng_for(self, seq: Sequence) -> np.random.Generator:
        if seq.params.seed is None:
            return self._rng
        rng = self._seq_rngs.get(seq.seq_id)
        if rng is None:
            rng = np.random.default_rng([seq.params.seed, seq.index])
            self._seq_rngs[seq.seq_id] = rng
        return rng


def _softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def top_logprobs(row: np.ndarray, token: int, n: int) -> dict[int, float]:
    """The chosen token's log-probability plus the top-n tokens', from raw logits."""
    row = row.astype(np.float64)
    m = row.max()
    logz = m + np.log(np.exp(row - m).sum())
    top = np.argpartition(-row, n)[:n] if 0 < n < row.size else np.arange(row.size)[:n]
    ids = [token] + [int(t) for t in top[np.argsort(-row[top], kind="stable")]]
    return {i: float(row[i] - logz) for i in ids}
