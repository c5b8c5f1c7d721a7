"""preemption_mode="swap" on the CUDA backend in emulation: SmolLM2-135M-Instruct on CudaOps over the
emulation device (its swap path: pinned-memory pool, runs of blocks, copy_async), with a 4-block KV
pool, against the same backend with a roomy pool. Emulation is slow: two prompts, three tokens.
"""
from __future__ import annotations

import numpy as np

from cupaged.backend.cuda import CudaOps
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.api.test_swap import generate_watching_kv
from tests.emu.device import EmuDevice

BLOCK = 8
BLOCK_BYTES = BLOCK * 2 * 30 * 3 * 64 * 2  # one 8-token KV block of SmolLM2-135M in fp16
LOGPROB_TOL = 3e-2  # fp16 rounding between batch compositions (measured up to 1e-2); the KV is checked bit for bit


def emu_llm(model_dir, num_blocks: int, **kw) -> LLM:
    ops = CudaOps(EmuDevice(), dtype="float16", partition_size=64)
    return LLM(model=str(model_dir), backend=ops, block_size=BLOCK, kv_cache_memory=num_blocks * BLOCK_BYTES,
               max_model_len=32, progress=False, **kw)


def test_swapped_greedy_outputs_equal_a_roomy_run(smollm2_dir):
    # Two 15-token prompts fill the 4 blocks; at position 16 (the third token) the first needs a third
    # block, so the second is swapped out (2 blocks) and comes back once the first has finished.
    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": rng.integers(100, 49_000, 15).tolist()} for _ in range(2)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1)
    tight = emu_llm(smollm2_dir, 4, preemption_mode="swap", swap_space=4 * BLOCK_BYTES / 2**30)
    engine, device = tight.engine, tight.engine.ops.device
    got = generate_watching_kv(tight, prompts, params)  # the swapped-in blocks are checked bit for bit
    assert engine.scheduler.num_swap_outs == engine.scheduler.num_swap_ins == 1
    assert engine.scheduler.num_preemptions == 1, "nothing was recomputed"
    assert engine.runner.num_blocks_swapped_out == engine.runner.num_blocks_swapped_in == 2
    # per layer: out and in, one copy per run and per K / V; each run holds 1 or 2 blocks
    layers = engine.model_config.num_layers
    assert 4 * layers <= len(device.copies) <= 8 * layers and sum(device.copies) == 4 * BLOCK_BYTES
    ref = emu_llm(smollm2_dir, 16).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    for g, r in zip(got, ref):  # a wrong KV row rarely flips a token, but it moves the log-probs
        for lp_got, lp_ref, token in zip(g.outputs[0].logprobs, r.outputs[0].logprobs, r.outputs[0].token_ids):
            assert abs(lp_got[token] - lp_ref[token]) < LOGPROB_TOL, (lp_got, lp_ref)
    assert engine.block_manager.num_free_blocks == 4 and engine.block_manager.host.num_free_blocks == 4
