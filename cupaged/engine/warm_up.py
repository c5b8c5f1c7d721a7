"""Warm-up: one tiny request run through an idle engine before it serves, so that the backend's
kernels are compiled (Numba, first run on a machine) or loaded from their cache now, not inside the
first real request, where a server would answer /health "ok" and then take seconds over the first token."""
from __future__ import annotations

from cupaged.engine.engine import LLMEngine
from cupaged.errors import CupagedError
from cupaged.sampling_params import SamplingParams

WARM_UP_ID = "cupaged-warm-up"


def warm_up(engine: LLMEngine) -> None:
    """Run an 8-token prefill and one decode step to the end. The engine must be idle (no request, no
    other thread driving it). It leaves no trace a caller sees: its blocks are freed, its salt keeps
    them from any prompt's prefix, and the prefix-cache counters and recorded queue times are as before."""
    if engine.has_unfinished_requests():
        raise CupagedError("warm_up needs an idle engine: requests are running")
    bm, times = engine.block_manager, engine.scheduler.queue_times
    queries, hits, num_times = bm.prefix_cache_queries, bm.prefix_cache_hits, len(times or ())
    ids = [i % engine.model_config.vocab_size for i in range(100, 108)]
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
