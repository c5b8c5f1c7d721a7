"""Beam search over forked sequences, with vLLM v0's semantics.

A request with `use_beam_search` keeps up to `width = best_of` live beams. Each beam is a
Sequence whose KV blocks it shares with its relatives through the block manager's ref
counts. A search step runs once every live beam has the log-probabilities of its next token
(log-softmax of the raw logits, float64, on the host). The beams of one request normally
sample in the same engine step; under preemption or a tight token budget one may lag, and
the beams ahead of it wait, scheduled for 0 tokens, holding their log-probabilities.

One step:
1. Candidates: the best 2 * width (beam, token) pairs over all live beams by cumulative
   log-probability c_beam + log p_beam(token). Ties go to the lower beam, then token id.
2. Each candidate is a new sequence (its beam's tokens + the token), checked for a stop like
   any sequence: EOS (unless ignore_eos), stop_token_ids, stop strings, max_tokens, context.
3. Finished candidates join the finished hypotheses, of which the best `width` by score are
   kept. Running candidates are ranked by score.
4. The search ends when no candidate is running, or when `width` hypotheses are finished and
   early_stopping says so. Otherwise the best `width` running candidates become the new beams:
   each is forked from its beam (all blocks shared; the shared, partly filled last block is
   copied on the first write), and every old beam is freed at once.

score = cumulative_logprob / L ** length_penalty, L = prompt + output tokens, a final EOS token
not counted (as vLLM v0 and Hugging Face, whose lengths include the prompt).

early_stopping, once `width` hypotheses are finished (h_worst the worst one kept):
- True: stop.
- False: stop when score(h_worst) >= the score of the best running candidate at its length.
- "never": stop when score(h_worst) >= the best score that candidate can still reach. With
  length_penalty > 0 that is at the longest length it can grow to, min(prompt + max_tokens,
  max_model_len) (vLLM v0 takes the max of the two: a looser bound, so the same hypotheses after
  more steps); otherwise at its current length.

The request's output is the best n finished hypotheses by score, best first (text, token ids,
cumulative_logprob, finish_reason, and per-position log-probabilities if asked for).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cupaged.engine.sampler import top_logprobs
from cupaged.engine.sequence import Sequence
from cupaged.model.tokenizer import IncrementalDetokenizer

# update_text(seq, token, detok): add the token's text, return why seq stops (or None)
UpdateText = Callable[[Sequence, int, IncrementalDetokenizer], "str | None"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits [..., V] -> log-probabilities [..., V] in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class BeamSearch:
    """The live beams and the finished hypotheses of one request."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer, eos_token_ids: set[int], max_model_len: int):
        self.params = seq.params
        self.width = seq.params.best_of
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.beams: list[Sequence] = [seq]
        self.finished: list[Sequence] = []  # best score first, at most width
        self.done = False
        self._detoks: dict[int, IncrementalDetokenizer] = {seq.seq_id: detok}  # beams' and hypotheses'
        self._rows: dict[int, np.ndarray] = {}  # beam seq_id -> [V] log-probs of its next token

    def offer(self, beam: Sequence, logprobs: np.ndarray) -> None:
        """logprobs [V] float64: the log-probabilities of beam's next token."""
        self._rows[beam.seq_id] = logprobs

    def ready(self) -> bool:
        """Does every live beam have its next-token log-probabilities?"""
        return not self.done and all(beam.seq_id in self._rows for beam in self.beams)

    def step(self, update_text: UpdateText) -> tuple[list[tuple[Sequence, Sequence]], list[Sequence]]:
        """One search step. Returns the (child, beam) pairs that go on (the caller forks each child's
        blocks from its beam and runs it) and the old beams, which the caller frees."""
        children = [self._extend(beam, token, cum, row, update_text) for beam, token, cum, row in self._expand()]
        go_on = self._select(children)
        retired, self.beams = self.beams, [child for child, _ in go_on]
        self._rows.clear()
        keep = {seq.seq_id for seq in self.beams + self.finished}
        self._detoks = {sid: d for sid, d in self._detoks.items() if sid in keep}
        return go_on, retired

    def best(self, n: int) -> list[tuple[Sequence, IncrementalDetokenizer]]:
        """The n best finished hypotheses and their text, best first."""
        return [(seq, self._detoks[seq.seq_id]) for seq in self.finished[:n]]

    def score(self, seq: Sequence) -> float:
        length = seq.num_tokens - int(seq.num_output_tokens > 0 and seq.token_ids[-1] in self.eos_token_ids)
        return seq.cumulative_logprob / length ** self.params.length_penalty

    # --- a step ---------------------------------------------------------------------------
    def _expand(self) -> list[tuple[Sequence, int, float, np.ndarray]]:
        """The best 2 * width (beam, token, cumulative log-prob, beam's row) continuations, best first."""
        rows = np.stack([self._rows[beam.seq_id] for beam in self.beams])  # [B, V]
        cum = np.array([beam.cumulative_logprob for beam in self.beams])   # [B]
        flat = (rows + cum[:, None]).ravel()                               # [B * V]
        k = min(2 * self.width, flat.size)
        top = np.argpartition(-flat, k - 1)[:k]
        top = top[np.lexsort((top, -flat[top]))]  # best first; ties: lower beam, then lower token
        vocab = rows.shape[1]
        return [(self.beams[i // vocab], int(i % vocab), float(flat[i]), rows[i // vocab]) for i in top]

    def _extend(self, beam: Sequence, token: int, cum: float, row: np.ndarray,
                update_text: UpdateText) -> tuple[Sequence, Sequence]:
        child = beam.fork()
        n = self.params.logprobs
        child.append_token(token, top_logprobs(row, token, n) if n is not None else None)
        child.cumulative_logprob = cum
        detok = self._detoks[beam.seq_id].fork()
        reason = update_text(child, token, detok)
        if reason:
            child.finish(reason)
        self._detoks[child.seq_id] = detok
        return child, beam

    def _select(self, children: list[tuple[Sequence, Sequence]]) -> list[tuple[Sequence, Sequence]]:
        """Keep the best `width` finished hypotheses; return the (child, beam) pairs that go on,
        none once the search is done."""
        finished = self.finished + [child for child, _ in children if child.is_finished]
        finished.sort(key=self.score, reverse=True)  # stable: on a tie the older hypothesis first
        self.finished = finished[:self.width]
        running = sorted((c for c in children if not c[0].is_finished), key=lambda c: self.score(c[0]), reverse=True)
        if not running:
            self.done = True
        elif len(self.finished) < self.width:
            self.done = False
        else:
            self.done = self._cannot_improve(running[0][0], self.finished[-1])
        return [] if self.done else running[:self.width]

    def _cannot_improve(self, best_running: Sequence, worst_finished: Sequence) -> bool:
        p = self.params
        if p.early_stopping is True:
            return True
        if p.early_stopping == "never" and p.length_penalty > 0:
            longest = self.max_model_len
            if p.max_tokens:
                longest = min(best_running.num_prompt_tokens + p.max_tokens, longest)
            best = best_running.cumulative_logprob / longest ** p.length_penalty
        else:
            best = self.score(best_running)
        return self.score(worst_finished) >= best
