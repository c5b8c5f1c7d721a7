"""Sequence: one stream of tokens (prompt + output) and the KV blocks that hold it."""
from __future__ import annotations

import itertools
import time
from enum import Enum, auto

from cupaged.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    SWAPPED = auto()     # preempted with its KV moved to host memory (preemption_mode "swap")
    FINISHED = auto()


_seq_counter = itertools.count()


class Sequence:
    """A prompt and its growing output.

    `num_computed_tokens` counts tokens whose K/V are in the cache. The scheduler gives a
    sequence `num_tokens - num_computed_tokens` tokens to compute (capped by the budget):
    a whole prompt, a chunk of it, or the one token sampled last step.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, index: int = 0,
                 cache_salt: str | None = None):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index                    # which of the request's n outputs
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.host_block_table: list[int] = []  # host (swap pool) block ids while SWAPPED, else empty
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0         # sum of the chosen tokens' log-probabilities, where known
        self.num_preemptions = 0
        self.queued_at: float | None = time.monotonic()  # when it joined the queue; None once scheduled
        # prefix cache: requests with different salts never share blocks
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids, lazily
        self.num_cached_blocks = 0  # leading blocks of block_table already in the prefix cache
        # where it ends (set_limits): a token in stop_ids, or max_len tokens in all
        self.stop_ids: frozenset[int] = frozenset(params.stop_token_ids or ())
        self.max_len = self.num_prompt_tokens + params.max_tokens if params.max_tokens else 2**62

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.name})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_seats(self) -> int:
        """Places in max_num_seqs this sequence stands for: best_of until its first token (the
        request's other samples or beams fork from it then), else 1."""
        return self.params.best_of if self.num_output_tokens == 0 else 1

    def set_limits(self, eos_token_ids: set[int], max_model_len: int) -> None:
        """Fix the ends checked after each token: `stop_ids` (the model's EOS ids unless ignore_eos,
        plus the request's stop_token_ids) and `max_len` (prompt + max_tokens, within the context)."""
        if not self.params.ignore_eos:
            self.stop_ids = self.stop_ids | frozenset(eos_token_ids)
        self.max_len = min(self.max_len, max_model_len)

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """logprobs: the position's log-probabilities, which include the chosen token's."""
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id]

    def fork(self) -> Sequence:
        """A new waiting sequence with this one's tokens and log-probabilities, holding no blocks
        (BlockManager.fork shares them)."""
        child = Sequence(self.request_id, self.prompt_token_ids, self.params, self.index)
        child.token_ids = list(self.token_ids)
        child.logprobs = list(self.logprobs)
        child.cumulative_logprob = self.cumulative_logprob
        child.stop_ids, child.max_len = self.stop_ids, self.max_len
        child.queued_at = None  # it never queued: it runs from its parent's step
        return child

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        """Forget the cached K/V (its blocks were freed); prompt and output are kept."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
