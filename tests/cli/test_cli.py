"""The `cupaged` CLI through click's runner, checked against the Python API on the same model."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cupaged.cli.main import main
from cupaged.sampling_params import SamplingParams

GREEDY = ["--backend", "cpu", "--temperature", "0", "--frequency-penalty", "0", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_help_lists_every_command(runner):
    out = runner.invoke(main, ["--help"]).output
    for command in ("chat", "generate", "serve", "pull", "models", "env", "clear-cache", "bench"):
        assert command in out
    assert "serve (OpenAI-compatible HTTP)" in " ".join(out.split())
    chat_help = runner.invoke(main, ["chat", "--help"]).output
    for option in ("--model", "--backend", "--system", "--temperature", "--top-p", "--max-tokens", "/reset", "/exit"):
        assert option in chat_help


def test_unknown_option_is_refused(runner):
    result = runner.invoke(main, ["chat", "--no-such-option"])
    assert result.exit_code == 2 and "no-such-option" in result.output


@pytest.mark.parametrize("args, problem", [(["--temperature", "-1"], "temperature"),
                                           (["--top-p", "1.5"], "top_p"),
                                           (["--max-tokens", "0"], "max-tokens")])
def test_invalid_sampling_value_names_the_problem(runner, smollm2_dir, args, problem):
    result = runner.invoke(main, ["generate", "hi", "--model", str(smollm2_dir), "--backend", "cpu", *args])
    assert result.exit_code != 0 and problem in result.output


def test_unknown_model_names_the_problem(runner):
    result = runner.invoke(main, ["generate", "hi", "--model", "no-such-model-xyz"])
    assert result.exit_code == 1 and "no-such-model-xyz" in result.output


def test_generate_json_matches_the_api(runner, smollm2_dir, smol_llm):
    result = runner.invoke(main, ["generate", "The capital of France is", "--model", str(smollm2_dir), *GREEDY, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ref = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert data["outputs"][0]["token_ids"] == ref.token_ids
    assert data["outputs"][0]["text"] == ref.text


def test_generate_reads_stdin_and_separates_completions(runner, smollm2_dir, smol_llm):
    piped = runner.invoke(main, ["generate", "-", "--model", str(smollm2_dir), *GREEDY, "--json"],
                          input="The capital of France is")
    assert piped.exit_code == 0, piped.output
    ref = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert json.loads(piped.stdout)["outputs"][0]["text"] == ref.text
    four = runner.invoke(main, ["generate", "Name a colour:", "--model", str(smollm2_dir), "--n", "4",
                                "--temperature", "1.0", "--seed", "3", "--max-tokens", "4"])
    assert four.exit_code == 0, four.output
    heads = [line for line in four.stdout.splitlines() if line.startswith("--- completion ")]
    assert [h.split(" of ")[0] for h in heads] == [f"--- completion {i}" for i in (1, 2, 3, 4)]
    empty = runner.invoke(main, ["generate", "-"], input="  \n")
    assert empty.exit_code == 2 and "the prompt is empty" in empty.output
    assert "no-chat]" in runner.invoke(main, ["generate", "--help"]).output  # [default: no-chat], maybe wrapped


def test_piped_chat_is_multi_turn_and_resets(runner, smollm2_dir, smol_llm):
    turns = ["Say hello.", "What did I just ask you?", "/reset", "Name a colour.", "/exit", "never read"]
    result = runner.invoke(main, ["chat", "--model", str(smollm2_dir), *GREEDY], input="\n".join(turns) + "\n")
    assert result.exit_code == 0, result.output
    params = SamplingParams(temperature=0, max_tokens=12)
    history, expected = [], []
    for turn in turns[:4]:
        if turn == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": turn})
        answer = smol_llm.chat(history, params).outputs[0].text
        history.append({"role": "assistant", "content": answer})
        expected.append(answer)
    assert result.stdout == "".join(a + "\n" for a in expected)
    assert "tok/s" in result.stderr and "conversation reset" in result.stderr


def test_models_and_env(runner, smollm2_dir):
    models = runner.invoke(main, ["models"])
    assert models.exit_code == 0 and "smollm2-135m-instruct" in models.output
    env = runner.invoke(main, ["env"])
    assert env.exit_code == 0 and "numpy" in env.output and "backend" in env.output


@pytest.mark.parametrize("gemm", ["numba", "blas"])
def test_env_says_cupy_threads_and_gemm_mode(runner, monkeypatch, gemm):
    import importlib.util

    import numba
    monkeypatch.setenv("CUPAGED_CPU_GEMM", gemm)
    # each line is a name padded to 12 columns, then its value
    lines = {line[:12].strip(): line[13:] for line in runner.invoke(main, ["env"]).output.splitlines()}
    has_cupy = importlib.util.find_spec("cupy") is not None
    assert lines["cupy"].startswith("not installed") != has_cupy
    assert lines["threads"].startswith(f"{numba.config.NUMBA_NUM_THREADS} Numba threads")
    assert lines["cpu gemm"].startswith(gemm)


def test_clear_cache_says_what_it_did(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPAGED_HOME", str(tmp_path))
    result = runner.invoke(main, ["clear-cache", "nothing-here", "--yes"])
    assert result.exit_code == 1 and "no cached model 'nothing-here'" in result.output
    (tmp_path / "models").mkdir()
    (tmp_path / "tmp").mkdir()
    result = runner.invoke(main, ["clear-cache", "--yes"])
    assert result.exit_code == 0 and "holds no models" in result.output
    (tmp_path / "models" / "a-model").mkdir()
    result = runner.invoke(main, ["clear-cache"], input="n\n")
    assert result.exit_code == 0 and "nothing deleted" in result.output and (tmp_path / "models" / "a-model").is_dir()
    result = runner.invoke(main, ["clear-cache"], input="y\n")
    assert result.exit_code == 0 and "removed 1 cached model(s): a-model" in result.output
    assert not (tmp_path / "models" / "a-model").exists()


def test_a_missing_model_path_is_named(runner, tmp_path):
    for missing in (str(tmp_path / "no" / "such"), "./not-here", "~/nowhere-cupaged"):
        result = runner.invoke(main, ["generate", "hi", "-m", missing])
        assert result.exit_code == 1 and "no such model directory or file" in result.output, result.output


def test_kv_cache_memory_too_small_is_named(runner, smollm2_dir):
    result = runner.invoke(main, ["generate", "hi", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--kv-cache-memory", "1KiB"])
    assert result.exit_code == 1 and "KV cache budget" in result.output


def test_kv_cache_memory_unparseable_is_refused(runner):
    result = runner.invoke(main, ["generate", "hi", "--kv-cache-memory", "lots"])
    assert result.exit_code == 2 and "lots" in result.output


def test_half_precision_on_the_cpu_is_refused_by_name(runner, smollm2_dir):
    result = runner.invoke(main, ["generate", "hi", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--dtype", "float16"])
    assert result.exit_code == 1 and "float32" in result.output


def test_engine_options_reach_the_engine(runner, smollm2_dir, smol_llm, monkeypatch):
    """--preemption-mode/--swap-space/--no-enable-prefix-caching/--enforce-eager land in EngineConfig, and
    three samples in a 4-block pool (each needs 2) still answer as the API does, swapping."""
    import cupaged.llm
    seen = {}
    real = cupaged.llm.LLMEngine

    def spy(config, ops=None):
        seen.update(vars(config))
        seen["engine"] = real(config, ops)
        return seen["engine"]

    monkeypatch.setattr(cupaged.llm, "LLMEngine", spy)
    args = ["generate", "The capital of France is", "--model", str(smollm2_dir), *GREEDY, "--max-tokens", "20",
            "--json", "--n", "3",
            "--preemption-mode", "swap", "--swap-space", "0.05", "--no-enable-prefix-caching", "--enforce-eager",
            "--max-model-len", "64", "--kv-cache-memory", str(4 * 16 * 2 * 30 * 3 * 64 * 4)]  # 4 blocks of 16

    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (seen["preemption_mode"], seen["swap_space"], seen["enable_prefix_caching"], seen["enforce_eager"]) \
        == ("swap", 0.05, False, True)
    assert seen["engine"].scheduler.num_swap_outs > 0
    ref = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=20, n=3))[0]
    assert [o["token_ids"] for o in json.loads(result.stdout)["outputs"]] == [o.token_ids for o in ref.outputs]


def test_bad_preemption_mode_is_refused(runner):
    result = runner.invoke(main, ["generate", "hi", "--preemption-mode", "drop"])
    assert result.exit_code != 0 and "preemption-mode" in result.output


def test_sampling_defaults_reach_the_request(runner, smollm2_dir, monkeypatch):
    """The measured chat defaults (cli/options.py DEFAULTS) are what a request without options samples with."""
    from cupaged.cli import options
    import cupaged.llm
    seen = {}
    real_generate = cupaged.llm.LLM.generate

    def spy(self, prompts, params=None, **kw):
        seen["params"] = params
        return real_generate(self, prompts, params, **kw)

    monkeypatch.setattr(cupaged.llm.LLM, "generate", spy)
    result = runner.invoke(main, ["generate", "Hi", "--model", str(smollm2_dir), "--backend", "cpu", "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    got = seen["params"]
    assert {k: getattr(got, k) for k in options.DEFAULTS} == options.DEFAULTS
