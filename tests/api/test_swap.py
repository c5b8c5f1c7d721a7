"""preemption_mode="swap" on the real SmolLM2-135M-Instruct (CPU): greedy outputs under a tiny KV
pool, with victims swapped to host memory and back (or recomputed when the swap space is full),
equal those of an undisturbed run with a roomy pool; an abort while swapped frees every block.

Tokens alone are a weak check here: one wrong KV row among ~60 rarely flips a greedy token. So the
log-probability of every chosen token must also match the undisturbed run's to float noise, and
`generate_watching_kv` checks that a sequence swapped back in finds its KV rows bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.errors import InvalidRequestError
from cupaged.llm import LLM
from tests.api.test_generate import BLOCK_BYTES, assert_all_blocks_free, assert_same_or_tie, greedy, random_prompts

PROMPTS = random_prompts([60, 58, 62, 57], seed=11)  # 4 blocks each at first (the whole pool), 6 by the end
PARAMS = greedy(24, logprobs=2)
LOGPROB_TOL = 1e-3  # float32 noise between different batch compositions is ~1e-5


def kv_rows(engine, seq, n: int) -> np.ndarray:
    """The raw K and V rows of seq's first n positions in every layer: [layers, 2, n, Hk, D]."""
    bs = engine.config.block_size
    slots = [seq.block_table[p // bs] * bs + p % bs for p in range(n)]
    rows = []
    for cache in (c for kv in engine.runner.kv_caches for c in kv):
        host = cache if isinstance(cache, np.ndarray) else cache.get()
        rows.append(host.reshape(-1, *host.shape[2:])[slots])
    return np.stack(rows).reshape(-1, 2, n, *rows[0].shape[1:])


def generate_watching_kv(llm: LLM, prompts, params) -> list:
    """llm.generate, one step at a time: a sequence that comes back from the swap pool must find the
    K/V rows of its computed tokens exactly as they were in the step before it was swapped out."""
    engine = llm.engine
    ids = [engine.add_request(None, p, params) for p in prompts]
    before: dict[int, tuple[int, np.ndarray]] = {}
    done = {}
    while engine.has_unfinished_requests():
        for seq in engine.scheduler.running:
            before[seq.seq_id] = (seq.num_computed_tokens, kv_rows(engine, seq, seq.num_computed_tokens))
        swapped = list(engine.scheduler.swapped)
        for out in engine.step():
            done[out.request_id] = out
        for seq in swapped:
            if seq.block_table:  # swapped back in by this step
                n, rows = before[seq.seq_id]
                assert np.array_equal(kv_rows(engine, seq, n).view(np.uint8), rows.view(np.uint8)), \
                    f"{seq} came back with different K/V"
    return [done[i] for i in ids]


def swap_llm(model_dir, swap_blocks: int) -> LLM:
    """16 device blocks (256 tokens) and a swap pool of swap_blocks blocks."""
    return LLM(model=str(model_dir), backend="cpu", kv_cache_memory=16 * BLOCK_BYTES, max_model_len=256,
               preemption_mode="swap", swap_space=swap_blocks * BLOCK_BYTES / 2**30, progress=False)


@pytest.fixture(scope="module")
def reference(smol_llm):
    """The same requests with a roomy pool: nothing is ever preempted."""
    before = smol_llm.engine.scheduler.num_preemptions
    out = smol_llm.generate(PROMPTS, PARAMS)
    assert smol_llm.engine.scheduler.num_preemptions == before
    return out


def assert_same_outputs(got, ref, what: str) -> None:
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.outputs[0], r.outputs[0]
        assert g.finish_reason == "length"
        assert_same_or_tie(g.token_ids, r.token_ids, r.logprobs, f"prompt {i} {what}")
        for step, (a, b) in enumerate(zip(g.token_ids, r.token_ids)):
            if a != b:
                break  # a forgiven near-tie: the continuations differ from here
            diff = abs(g.logprobs[step][a] - r.logprobs[step][a])
            assert diff < LOGPROB_TOL, f"prompt {i} {what}: token {step}'s log-prob is off by {diff:.2e}"


def assert_host_pool_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.host.num_free_blocks == bm.host.num_blocks and not any(bm.host.ref_cnt)
    assert bm.host.twins() == {}


def test_swapping_keeps_greedy_outputs(smollm2_dir, reference):
    llm = swap_llm(smollm2_dir, swap_blocks=64)
    engine = llm.engine
    assert engine.block_manager.num_blocks == 16 and engine.block_manager.host.num_blocks == 64
    assert len(engine.runner.host_caches) == engine.model_config.num_layers
    got = generate_watching_kv(llm, PROMPTS, PARAMS)
    sched, runner = engine.scheduler, engine.runner
    assert sched.num_swap_outs >= 2, "the workload was meant to swap"
    assert sched.num_preemptions == sched.num_swap_outs, "the swap space had room: nothing was recomputed"
    assert sched.num_swap_ins == sched.num_swap_outs
    assert runner.num_blocks_swapped_in == runner.num_blocks_swapped_out > 0
    assert_same_outputs(got, reference, "swapped out and back")
    assert_all_blocks_free(llm)
    assert_host_pool_free(llm)


def test_full_swap_space_falls_back_to_recompute(smollm2_dir, reference):
    llm = swap_llm(smollm2_dir, swap_blocks=5)  # one victim of <= 5 blocks at a time
    got = generate_watching_kv(llm, PROMPTS, PARAMS)
    sched = llm.engine.scheduler
    assert sched.num_swap_outs >= 1, "some victim fits the swap space"
    assert sched.num_preemptions > sched.num_swap_outs, "and some victim was recomputed instead"
    assert_same_outputs(got, reference, "with a full swap space")
    assert_all_blocks_free(llm)
    assert_host_pool_free(llm)


def test_abort_while_swapped_frees_both_pools(smollm2_dir):
    llm = swap_llm(smollm2_dir, swap_blocks=64)
    engine = llm.engine
    ids = [engine.add_request(None, p, PARAMS) for p in PROMPTS]
    while not engine.scheduler.swapped:
        engine.step()
    (victim,) = engine.scheduler.swapped
    assert victim.host_block_table and engine.block_manager.host.num_free_blocks == 64 - len(victim.host_block_table)
    engine.abort(victim.request_id)
    assert victim.is_finished and victim.host_block_table == [] and not engine.scheduler.swapped
    assert_host_pool_free(llm)
    for _ in range(2):  # the others go on
        assert engine.step()
    for rid in ids:
        engine.abort(rid)
    assert_all_blocks_free(llm)
    assert_host_pool_free(llm)


def test_recompute_mode_allocates_no_swap_pool(smollm2_dir):
    llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256,
              swap_space=4, progress=False)
    assert llm.engine.block_manager.host.num_blocks == 0 and llm.engine.runner.host_caches == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(preemption_mode="swapping"), "preemption_mode must be 'recompute' or 'swap'"),
    (dict(swap_space=-1), "swap_space must be a finite number of GiB >= 0"),
    (dict(swap_space=float("nan")), "swap_space must be a finite number of GiB >= 0"),
    (dict(swap_space="4GiB"), "swap_space must be a finite number of GiB >= 0"),
    (dict(preemption_mode="swap", swap_space=1e6), "swap_space 1000000.0 GiB is more than 70%"),
])
def test_bad_swap_settings_are_named(smollm2_dir, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        LLM(model=str(smollm2_dir), backend="cpu", progress=False, **kwargs)
