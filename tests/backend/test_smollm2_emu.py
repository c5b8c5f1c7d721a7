"""SmolLM2-135M-Instruct on the CUDA backend in emulation against the CPU backend (float32).

The CUDA backend's whole Python layer and every kernel of a forward run here: CudaOps on the
emulation device (NumPy arrays, kernels through the host emulator, NumPy for cuBLAS).
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.backend.cuda import CudaOps
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.emu.device import EmuDevice
from tests.model.helpers import engine_logits

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
NEAR_TIE = 0.1  # logits: a lead this small on the CPU may flip in half precision


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def emu_llm(request, smollm2_dir):
    ops = CudaOps(EmuDevice(), dtype=request.param, partition_size=64)
    return LLM(model=str(smollm2_dir), backend=ops, kv_cache_memory=16 * 2**20, max_model_len=256,
               progress=False)


def test_step0_logits_and_greedy_tokens_match_cpu(emu_llm, smol_llm):
    ids = smol_llm.chat_prompt(PROMPT)["prompt_token_ids"]
    ours, ref = engine_logits(emu_llm.engine, ids), engine_logits(smol_llm.engine, ids)
    rel = 2e-2 if emu_llm.engine.ops.dtype == np.float16 else 6e-2
    assert np.abs(ours - ref).max() <= rel * np.abs(ref).max()
    assert set(np.argsort(-ours)[:5]) == set(np.argsort(-ref)[:5])

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    cpu = smol_llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0]
    emu = emu_llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0]
    for step, (a, b) in enumerate(zip(emu.token_ids, cpu.token_ids)):
        if a != b:
            top2 = sorted(cpu.logprobs[step].values(), reverse=True)[:2]
            assert top2[0] - top2[1] < NEAR_TIE, f"step {step}: {a} != {b} without a near-tie on the CPU"
            break
