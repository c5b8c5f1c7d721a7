"""Ordinary mistakes on every `cupaged` command end in one `Error:` line and exit code 2 (usage: click
refused the command line) or 1 (runtime: the model, the backend or the host said no), never a traceback."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from cupaged.backend import cuda_available
from cupaged.cli.main import main

USAGE, RUNTIME = 2, 1
NO_GPU = pytest.mark.skipif(cuda_available(), reason="needs a machine without CuPy or a GPU")


def run(args: list[str]):
    result = CliRunner().invoke(main, args)
    # an exception click did not turn into an exit code would be the traceback a user sees
    assert isinstance(result.exception, SystemExit), f"{args}: {result.exception!r}\n{result.output}"
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    return result.exit_code, errors[0]


BENCH_CASES = [
    (["throughput", "-m", "bogus"], RUNTIME, "unknown model 'bogus'"),
    (["latency", "-m", "bogus"], RUNTIME, "unknown model 'bogus'"),
    (["chunked", "-m", "bogus"], RUNTIME, "unknown model 'bogus'"),
    (["startup", "-m", "bogus"], RUNTIME, "unknown model 'bogus'"),
    (["throughput", "--input-len", "abc"], USAGE, "--input-len"),
    (["throughput", "--output-len", "9:3"], USAGE, "--output-len"),
    (["throughput", "--concurrency", "0"], USAGE, "--concurrency"),
    (["latency", "--concurrency", "0"], USAGE, "positive integers"),
    (["overhead", "--running", "x"], USAGE, "--running"),
    (["memory", "--rate", "-1", "--no-plot"], USAGE, "--rate"),
    (["memory", "--prefix-len", "5000", "--no-plot"], RUNTIME, "prefix_len 5000"),
    (["serve", "--base-url", "http://127.0.0.1:9"], RUNTIME, "could not ask"),
    (["serve", "--request-rate", "fast"], USAGE, "--request-rate"),
    (["kernels", "--no-such-option"], USAGE, "no-such-option"),
    (["bogus-subcommand"], USAGE, "bogus-subcommand"),
]


@pytest.mark.parametrize("args, code, says", BENCH_CASES, ids=[" ".join(c[0]) for c in BENCH_CASES])
def test_bench_mistakes_end_in_one_error_line(args, code, says):
    got, line = run(["bench", *args])
    assert got == code and says in line, line


@pytest.mark.parametrize("args, says", [(["throughput", "--input-len", "9000", "-n", "1"], "--input-len"),
                                        (["latency", "--input-len", "9000", "--concurrency", "1"], "--input-len"),
                                        (["chunked", "--long-input-len", "9000"], "--long-input-len")])
def test_bench_prompt_over_the_context_is_a_usage_error(smollm2_dir, args, says):
    got, line = run(["bench", *args, "-m", str(smollm2_dir), "--backend", "cpu"])
    assert got == USAGE and says in line and "context length" in line, line


@NO_GPU
@pytest.mark.parametrize("args", [["throughput"], ["latency"], ["chunked"], ["startup", "--repeats", "1"]])
def test_bench_cuda_without_a_gpu_says_what_is_missing(smollm2_dir, args):
    got, line = run(["bench", *args, "-m", str(smollm2_dir), "--backend", "cuda"])
    assert got == RUNTIME and "needs CuPy" in line and "CalledProcessError" not in line, line


@NO_GPU
def test_bench_kernels_without_a_gpu(smollm2_dir):
    got, line = run(["bench", "kernels"])
    assert got == RUNTIME and "GPU" in line, line


@pytest.mark.parametrize("option, value, says", [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"),
                                                 ("--top-k", "-3", "top_k"), ("--seed", "-1", "seed"),
                                                 ("--temperature", "nan", "finite")])
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_sampling_values_are_refused_before_the_model_loads(command, option, value, says):
    # the model path does not exist: a refusal naming the option shows the check ran first
    got, line = run([*command, "--model", "/no/such/model", option, value])
    assert got == USAGE and option in line and says in line, line
