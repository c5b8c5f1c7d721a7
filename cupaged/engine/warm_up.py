"""Warm-up: one short request run through an idle engine before it serves, so that the backend's
kernels are compiled (Numba, first run on a machine) or loaded from their cache now, not inside the
first real request, where a server would answer /health "ok" and then take seconds over the first token."""
from __future__ import annotations

from cupaged.engine.engine import LLMEngine
from cupaged.errors import CupagedError
from cupaged.sampling_params import SamplingParams

WARM_UP_ID = "cupaged-warm-up"


WARM_UP_TOKENS = 64  # a prompt long enough for every kernel path: the CPU's threaded norms start at 64 rows


def warm_up(engine: LLMEngine) -> None:
    """Run a WARM_UP_TOKENS-token prefill (fewer if the model's context is shorter) and one decode step
    to the end. The engine must be idle (no request, no
    other thread driving it). It leaves no trace a caller sees: its blocks are freed, its salt keeps
    them from any prompt's prefix, and the prefix-cache counters and recorded queue times are as before."""
    if engine.has_unfinished_requests():
        raise CupagedError("warm_up needs an idle engine: requests are running")
    bm, times = engine.block_manager, engine.scheduler.queue_times
    queries, hits, num_times = bm.prefix_cache_queries, bm.prefix_cache_hits, len(times or ())
    n = max(1, min(WARM_UP_TOKENS, engine.max_model_len - 2))
    ids = [(100 + i) % engine.model_config.vocab_size for i in range(n)]
    engine.add_request(WARM_UP_ID, {"prompt_token_ids": ids, "cache_salt": WARM_UP_ID},
                       SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    try:
        while not engine.is_finished(WARM_UP_ID):
            engine.step()
    finally:
        engine.abort(WARM_UP_ID)
        bm.prefix_cache_queries, bm.prefix_cache_hits = queries, hits
        if times is not None:
            del times[num_times:]
