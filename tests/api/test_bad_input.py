"""Bad input gets an error that names the problem, and the engine keeps serving: after each error a
normal request still completes and no KV block is leaked."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from cupaged.errors import InvalidRequestError, ModelNotFoundError, OutOfMemoryError, WeightsError
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.api.test_generate import BLOCK_BYTES, assert_all_blocks_free, greedy

SMALL_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def assert_still_serves(llm: LLM) -> None:
    assert_all_blocks_free(llm)
    out = llm.generate("The capital of France is", greedy(2))[0].outputs[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length" and out.text
    assert_all_blocks_free(llm)


# --- requests -------------------------------------------------------------------------------------
def test_prompt_longer_than_the_context(smol_llm):
    limit = smol_llm.engine.max_model_len
    ids = np.random.default_rng(0).integers(100, 49_000, size=limit).tolist()
    with pytest.raises(InvalidRequestError, match=rf"prompt is {limit} tokens.*context length is {limit}"):
        smol_llm.generate({"prompt_token_ids": ids})
    assert_still_serves(smol_llm)


def test_prompt_one_short_of_the_context_gets_one_token(smollm2_dir):
    llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=20 * BLOCK_BYTES, max_model_len=64,
              progress=False)
    ids = np.random.default_rng(1).integers(100, 49_000, size=63).tolist()
    out = llm.generate({"prompt_token_ids": ids}, greedy(10))[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="context length is 64"):
        llm.generate({"prompt_token_ids": ids + [5]})
    assert_still_serves(llm)


@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}, {"prompt": ""}, []], ids=repr)
def test_empty_prompt(smol_llm, prompt):
    with pytest.raises(InvalidRequestError, match="empty"):
        smol_llm.engine.add_request(None, prompt, greedy(2))
    assert_still_serves(smol_llm)


def test_prompt_dict_without_a_prompt(smol_llm):
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        smol_llm.generate({"text": "hello"})
    assert_still_serves(smol_llm)


def test_token_id_outside_the_vocabulary(smol_llm):
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 49152\)"):
        smol_llm.generate({"prompt_token_ids": [1, 2, 49152]})
    with pytest.raises(InvalidRequestError, match="token ids"):
        smol_llm.generate({"prompt_token_ids": [-1, 5]})
    assert_still_serves(smol_llm)


@pytest.mark.parametrize("kw, name", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                                      (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
                                      (dict(repetition_penalty=0), "repetition_penalty"),
                                      (dict(presence_penalty=3), "presence_penalty"),
                                      (dict(logprobs=-1), "logprobs")],
                         ids=lambda v: str(v))
def test_invalid_sampling_params(smol_llm, kw, name):
    with pytest.raises(InvalidRequestError, match=rf"\b{name}\b") as err:
        SamplingParams(**kw)
    assert str(list(kw.values())[0]) in str(err.value), "the message shows the bad value"
    assert_still_serves(smol_llm)


# Values that used to pass SamplingParams() and fail (or misbehave) only inside a step (issue 13's probes).
WRONG_TYPES = [
    (dict(skip_special_tokens=None), "skip_special_tokens"), (dict(skip_special_tokens=1.5), "skip_special_tokens"),
    (dict(stop=[1]), "stop"), (dict(stop=["a", b"x"]), "stop"), (dict(stop=""), "stop"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(top_k=float("nan")), "top_k"),
    (dict(logprobs=1.5), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"), (dict(n="2"), "n"),
    (dict(ignore_eos="no"), "ignore_eos"), (dict(stop_token_ids="1"), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(top_k=1.5), "top_k"),
    (dict(temperature=float("nan")), "temperature"), (dict(max_tokens=float("inf")), "max_tokens"),
    (dict(n=True), "n"), (dict(temperature="0.5"), "temperature"),
]


@pytest.mark.parametrize("kw, name", WRONG_TYPES, ids=lambda v: repr(v))
def test_wrong_types_are_refused_at_construction(smol_llm, kw, name):
    with pytest.raises(InvalidRequestError, match=rf"^{name}\b") as err:
        SamplingParams(**kw)
    assert repr(list(kw.values())[0]) in str(err.value), "the message shows the bad value"
    assert_still_serves(smol_llm)


def test_numpy_scalars_are_accepted():
    p = SamplingParams(n=np.int64(2), seed=np.int32(3), temperature=np.float32(0.5), top_k=np.int64(5),
                       ignore_eos=np.bool_(True), stop_token_ids=[np.int64(7)])
    assert p.n == 2 and p.stop_token_ids == [7] and isinstance(p.stop_token_ids[0], int)


def test_one_bad_prompt_refuses_the_whole_call(smol_llm):
    engine = smol_llm.engine
    prompts = ["The capital of France is", {"prompt_token_ids": [1, 2, 3]}, "", "def main():"]
    with pytest.raises(InvalidRequestError, match="empty"):
        smol_llm.generate(prompts, greedy(4))
    assert not engine.has_unfinished_requests()
    assert_still_serves(smol_llm)


def test_duplicate_request_id(smol_llm):
    engine = smol_llm.engine
    engine.add_request("dup", "Hello", greedy(3))
    with pytest.raises(InvalidRequestError, match="'dup' is already in use"):
        engine.add_request("dup", "Hello again", greedy(3))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["dup"] and outs[0].prompt == "Hello"
    assert len(outs[0].outputs[0].token_ids) == 3
    assert_still_serves(smol_llm)


# --- models ---------------------------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="no-such-model-xyz"):
        LLM(model="no-such-model-xyz", backend="cpu", progress=False)


def test_model_dir_without_config(tmp_path, smollm2_dir):
    for name in SMALL_FILES + ("model.safetensors",):
        os.symlink(smollm2_dir / name, tmp_path / name)
    with pytest.raises(WeightsError, match="config.json"):
        LLM(model=str(tmp_path), backend="cpu", progress=False)


def model_copy(src, dst, config_edit=None):
    """dst gets src's small files as symlinks and an (optionally edited) copy of config.json."""
    for name in SMALL_FILES:
        os.symlink(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    config.update(config_edit or {})
    (dst / "config.json").write_text(json.dumps(config))


def test_truncated_safetensors(tmp_path, smollm2_dir):
    model_copy(smollm2_dir, tmp_path)
    with open(smollm2_dir / "model.safetensors", "rb") as src, open(tmp_path / "model.safetensors", "wb") as dst:
        dst.write(src.read(4 << 20))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        LLM(model=str(tmp_path), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256, progress=False)


def test_wrong_tensor_shape(tmp_path, smollm2_dir):
    model_copy(smollm2_dir, tmp_path, {"intermediate_size": 1024})
    os.symlink(smollm2_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as err:
        LLM(model=str(tmp_path), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256, progress=False)
    message = str(err.value)
    assert "model.safetensors" in message
    assert re.search(r"mlp\.(gate|up|down)_proj\.weight", message), message
    assert "1536" in message and "1024" in message, f"the message shows both shapes: {message}"


def test_kv_cache_too_small_for_one_sequence(smollm2_dir):
    with pytest.raises(OutOfMemoryError, match="kv_cache_memory"):
        LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=1024, max_model_len=256, progress=False)
    with pytest.raises(OutOfMemoryError, match="max_model_len 256"):  # one block short of one sequence
        LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=15 * BLOCK_BYTES, max_model_len=256,
            progress=False)
    llm = LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=16 * BLOCK_BYTES, max_model_len=256,
              progress=False)
    assert llm.engine.block_manager.num_blocks == 16


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_gpu_memory_utilization_outside_its_range(value):
    from cupaged.config import EngineConfig
    with pytest.raises(InvalidRequestError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=value)
