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
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids\[2\] = 49152 is not a token id.*\[0, 49152\)"):
        smol_llm.generate({"prompt_token_ids": [1, 2, 49152]})
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids\[0\] = -1 is not a token id"):
        smol_llm.generate({"prompt_token_ids": [-1, 5]})
    assert_still_serves(smol_llm)


@pytest.mark.parametrize("kw, name", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                                      (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
                                      (dict(repetition_penalty=0), "repetition_penalty"),
                                      (dict(presence_penalty=3), "presence_penalty"),
                                      (dict(logprobs=-1), "logprobs"),
                                      (dict(length_penalty=-1e9, use_beam_search=True, best_of=2, temperature=0),
                                       "length_penalty")],
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


# --- typed validation at the boundary: config, prompts, chat messages -------------------------------
BAD_CONFIGS = [
    (dict(block_size=16.0), "block_size must be an int, got 16.0"),
    (dict(max_num_seqs=2.5), "max_num_seqs must be an int, got 2.5"),
    (dict(max_num_batched_tokens=True), "max_num_batched_tokens must be an int"),
    (dict(max_model_len=0), "max_model_len must be at least 2"),
    (dict(max_model_len=-5), "max_model_len must be at least 2"),
    (dict(max_model_len=512.0), "max_model_len must be an int or None"),
    (dict(kv_cache_memory="1GB"), "kv_cache_memory must be an int or None, got '1GB'"),
    (dict(kv_cache_memory=float("nan")), "kv_cache_memory must be an int or None"),
    (dict(kv_cache_memory=float("inf")), "kv_cache_memory must be an int or None"),
    (dict(kv_cache_memory=0), "kv_cache_memory is bytes and must be >= 1"),
    (dict(kv_cache_fraction=1), r"kv_cache_fraction must be in \(0, 0.9\]"),
    (dict(kv_cache_fraction=float("nan")), "kv_cache_fraction must be a finite number"),
    (dict(kv_cache_fraction=0.1, kv_cache_memory=2**20), "not both"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
    (dict(seed=1.5), "seed must be an int or None"),
    (dict(model=None), "model must be a model name"),
    (dict(model=""), "model must be a model name"),
    (dict(enforce_eager="no"), "enforce_eager must be a bool"),
    (dict(enable_prefix_caching=1), "enable_prefix_caching must be a bool"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization must be a finite number"),
    (dict(backend=None), "backend must be a str"),
]


@pytest.mark.parametrize("kw, message", BAD_CONFIGS, ids=lambda v: repr(v))
def test_bad_engine_config_is_refused_by_name(kw, message):
    from cupaged.config import EngineConfig
    with pytest.raises(InvalidRequestError, match=message):
        EngineConfig(**kw)


def test_numpy_ints_are_config_ints():
    from cupaged.config import EngineConfig
    config = EngineConfig(block_size=np.int64(16), max_num_seqs=np.int32(8), kv_cache_memory=np.int64(2**20))
    assert config.kv_cache_bytes() == 2**20


def test_unknown_engine_option_is_named(smollm2_dir):
    with pytest.raises(InvalidRequestError, match="unknown engine option.*max_num_seq\\b"):
        LLM(model=str(smollm2_dir), backend="cpu", max_num_seq=4)


def test_kv_pool_larger_than_memory_is_refused(smollm2_dir):
    from cupaged.config import physical_memory
    with pytest.raises(OutOfMemoryError, match="kv_cache_memory asks for .* more than 90% of the .* host memory"):
        LLM(model=str(smollm2_dir), backend="cpu", kv_cache_memory=2 * physical_memory(), progress=False)


def test_max_model_len_beyond_the_model_names_its_config(smollm2_dir):
    with pytest.raises(InvalidRequestError, match=r"max_model_len 100000 is longer .*config.json"):
        LLM(model=str(smollm2_dir), backend="cpu", max_model_len=100_000, kv_cache_memory=24 * BLOCK_BYTES,
            progress=False)


BAD_PROMPTS = [
    ([b"hello"], "a prompt must be a str, a list of token ids or a dict, got bytes"),
    ([[1.7, 2.2]], r"prompt token ids\[0\] must be a token id \(an int\), got 1.7"),
    ([[True, 2]], r"prompt token ids\[0\] must be a token id \(an int\), got True"),
    ({"prompt_token_ids": ["1"]}, r"prompt_token_ids\[0\] must be a token id"),
    ({"prompt_token_ids": "12"}, "prompt_token_ids must be a list of token ids"),
    ({"prompt": 5}, "prompt must be a str"),
    ({"prompt": "hi", "bogus": 1}, r"unknown prompt key\(s\) \['bogus'\]"),
    ([np.array([[1, 2]])], "1-D integer array"),
    ([np.array([1.0, 2.0])], "1-D integer array"),
    (3.5, "prompts must be a str, a dict or a list"),
    ([1, 2, 3], r"pass token ids as \[\[...\]\]"),
]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS, ids=lambda v: repr(v))
def test_bad_prompt_is_refused_by_name(smol_llm, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        smol_llm.generate(prompt, greedy(2))
    assert_still_serves(smol_llm)


def test_numpy_token_ids_are_a_prompt(smol_llm):
    ids = np.array([5, 6, 7], dtype=np.int64)
    assert smol_llm.generate([ids], greedy(2))[0].outputs[0].token_ids == \
        smol_llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy(2))[0].outputs[0].token_ids


BAD_CHATS = [
    ([{"content": "hi"}], "messages\\[0\\] has no 'role'"),
    ([{"role": "user"}], "messages\\[0\\] has no 'content'"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str, got 5"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
    ([{"role": "wizard", "content": "hi"}], r"role'\] must be one of system, user, assistant, tool, got 'wizard'"),
    ([], "messages must be a non-empty list"),
    ("hi", "messages must be a non-empty list"),
    (["hi"], r"messages\[0\] must be a dict"),
]


@pytest.mark.parametrize("messages, message", BAD_CHATS, ids=lambda v: repr(v))
def test_bad_chat_messages_are_refused_by_name(smol_llm, messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        smol_llm.chat(messages, greedy(2))
    assert_still_serves(smol_llm)


def test_bad_params_object_is_refused(smol_llm):
    with pytest.raises(InvalidRequestError, match="params must be SamplingParams"):
        smol_llm.generate("hi", {"temperature": 0})
    with pytest.raises(InvalidRequestError, match="params must be SamplingParams"):
        smol_llm.engine.add_request(None, "hi", {"temperature": 0})
    assert_still_serves(smol_llm)


# --- model files: each error names the file -----------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    ({"max_position_embeddings": 0}, r"config\.json: max_position must be an int >= 2"),
    ({"rms_norm_eps": "x"}, r"config\.json: rms_norm_eps must be a finite number > 0, got 'x'"),
    ({"num_attention_heads": 0}, r"config\.json: num_heads must be an int >= 1, got 0"),
    ({"num_key_value_heads": 5}, r"config\.json: num_kv_heads must be a divisor of num_heads 9"),
    ({"hidden_size": 576.5}, r"config\.json: hidden_size must be an int >= 1"),
    ({"eos_token_id": "x"}, r"config\.json: eos_token_ids must be token ids"),
], ids=lambda v: repr(v))
def test_bad_model_config_names_the_file(tmp_path, smollm2_dir, edit, message):
    model_copy(smollm2_dir, tmp_path, edit)
    os.symlink(smollm2_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=message):
        LLM(model=str(tmp_path), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256, progress=False)


@pytest.mark.parametrize("name, text", [("tokenizer.json", "{garbage"), ("tokenizer_config.json", "{garbage"),
                                        ("generation_config.json", "[1, 2"), ("tokenizer_config.json", "[1, 2]"),
                                        ("generation_config.json", '{"eos_token_id": "x"}')])
def test_garbage_tokenizer_files_name_the_file(tmp_path, smollm2_dir, name, text):
    for f in SMALL_FILES + ("config.json", "model.safetensors"):
        if f != name:
            os.symlink(smollm2_dir / f, tmp_path / f)
    (tmp_path / name).write_text(text)
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / name))):
        LLM(model=str(tmp_path), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256, progress=False)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_with_the_tensor_named(tmp_path, smollm2_dir, value):
    from safetensors.numpy import load_file, save_file

    from cupaged.weights.random_model import build_random_model
    model_dir = build_random_model(smollm2_dir, tmp_path / "m", overrides={"num_hidden_layers": 1})
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.0.mlp.down_proj.weight"
    assert name in tensors, sorted(tensors)
    tensors[name].reshape(-1)[123] = value
    save_file(tensors, path)
    with pytest.raises(WeightsError, match=rf"model\.safetensors: tensor '{re.escape(name)}' holds {value} at flat index 123"):
        LLM(model=str(model_dir), backend="cpu", kv_cache_memory=24 * BLOCK_BYTES, max_model_len=256, progress=False)
