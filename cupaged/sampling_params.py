"""SamplingParams: vLLM's names and meanings, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from cupaged.errors import InvalidRequestError
from cupaged.validation import check, is_bool, is_int, is_number


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 means greedy. top_k -1 (or 0) disables top-k; top_p 1 and min_p 0 disable
    their filters. Penalties follow vLLM: repetition_penalty > 1 discourages tokens seen in the
    prompt or output; presence/frequency penalties subtract from the logits of output tokens.
    `stop` strings are never part of the returned text. `logprobs=N` returns the top-N
    log-probabilities of each generated position (plus the chosen token).

    n > 1 draws n samples that share the prompt's KV blocks (one prefill). Beam search
    (`use_beam_search=True`, vLLM v0's names) keeps `best_of` beams and returns the best n
    hypotheses by cumulative log-probability / length ** length_penalty; it needs
    temperature 0 and no top-p/top-k/min-p filter or penalty (see cupaged/engine/beam.py).
    `early_stopping`: True stops once best_of hypotheses are finished, False when the best
    live beam's current score cannot beat the worst kept one, "never" when no live beam can.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    best_of: int | None = None            # default n; beams kept by beam search
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False    # True | False | "never" (beam search only)
    # What each RequestOutput holds: "cumulative" (all so far, every step), "delta" (only what is new,
    # every step) or "final" (one output, at the end). LLM.generate asks for "final".
    output_kind: str = "cumulative"
    stop_strings: list[str] = field(init=False, repr=False)
    # (temperature, top_p, top_k, needs the host path, seeded), packed once for the sampler's fast path
    packed: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_strings = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]
        if self.top_k == 0:
            self.top_k = -1
        if self.best_of is None:
            self.best_of = self.n
        self._validate()
        if self.use_beam_search:
            self._validate_beam_search()
        else:
            self._validate_sampling()
        needs_host = (self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
                      or self.min_p > 0.0 or self.logprobs is not None)
        self.packed = (float(self.temperature), float(self.top_p), int(self.top_k), needs_host, self.seed is not None)

    def _check_types(self) -> None:
        """Types before ranges, so no value reaches a step that would fail there: bools are bools, ints
        are ints (NumPy's too, never floats or bools), floats are finite numbers, stop strings are
        non-empty str and stop token ids ints >= 0. Each error names the field and the value."""
        for name in ("ignore_eos", "skip_special_tokens", "use_beam_search"):
            check(name, getattr(self, name), is_bool(getattr(self, name)), "a bool (True or False)")
        for name, optional in (("n", False), ("top_k", False), ("seed", True), ("max_tokens", True),
                               ("logprobs", True), ("best_of", True)):
            value = getattr(self, name)
            check(name, value, (optional and value is None) or is_int(value),
                   "an int" + (" or None" if optional else ""))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "length_penalty"):
            value = getattr(self, name)
            check(name, value, is_number(value) and math.isfinite(value), "a finite number")
        stop = self.stop
        ok = stop is None or (isinstance(stop, str) and stop) or (
            isinstance(stop, (list, tuple)) and all(isinstance(x, str) and x for x in stop))
        check("stop", stop, ok, "a non-empty str or a list of non-empty str")
        ids = self.stop_token_ids
        ok = ids is None or (isinstance(ids, (list, tuple)) and all(is_int(t) and t >= 0 for t in ids))
        check("stop_token_ids", ids, ok, "a list of token ids (ints >= 0)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed!r}")

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if self.n < 1:
            bad(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            bad(f"logprobs must be >= 0, got {self.logprobs}")
        if self.best_of < self.n:
            bad(f"best_of must be >= n, got best_of {self.best_of} with n {self.n}")
        if self.output_kind not in ("cumulative", "delta", "final"):
            bad(f"output_kind must be 'cumulative', 'delta' or 'final', got {self.output_kind!r}")

    def _validate_beam_search(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(f"{msg} when use_beam_search is set")

        if self.best_of < 2:
            bad(f"best_of (the beam width) must be at least 2, got {self.best_of} (width 1 is greedy: "
                f"temperature=0 without beam search)")
        if self.temperature != 0:
            bad(f"temperature must be 0, got {self.temperature}")
        if self.top_p != 1.0 or self.top_k != -1 or self.min_p != 0.0:
            bad(f"top_p must be 1, top_k -1 and min_p 0, got top_p {self.top_p}, top_k {self.top_k}, "
                f"min_p {self.min_p}")
        if self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty:
            bad("repetition_penalty, presence_penalty and frequency_penalty are not supported")
        if self.early_stopping not in (True, False, "never"):
            bad(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not -10 <= self.length_penalty <= 10:  # a score divides by length ** length_penalty
            bad(f"length_penalty must be in [-10, 10], got {self.length_penalty}")

    def _validate_sampling(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(f"{msg} without use_beam_search")

        if self.best_of != self.n:
            bad(f"best_of must equal n (choosing n of best_of samples is not implemented), got best_of "
                f"{self.best_of} with n {self.n}")
        if self.length_penalty != 1.0:
            bad(f"length_penalty has no effect and must be 1.0, got {self.length_penalty}")
        if self.early_stopping is not False:
            bad(f"early_stopping has no effect and must be False, got {self.early_stopping!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
