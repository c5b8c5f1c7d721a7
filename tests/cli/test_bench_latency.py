"""`cupaged bench latency` and `cupaged bench chunked` on SmolLM2 (CPU) at tiny sizes: the reports'
counts follow from the workload and the scheduler's rules; no timing is asserted."""
from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cupaged.cli.bench import summarize
from cupaged.cli.bench_latency import parse_levels
from cupaged.cli.main import main


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_latency_reports_every_level(runner, smollm2_dir):
    result = runner.invoke(main, ["bench", "latency", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--concurrency", "1,3", "--input-len", "8", "--output-len", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["backend"] == "cpu" and "cores" in report["machine"]
    assert [r["concurrency"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        c = row["concurrency"]
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (c, 8 * c, 4 * c)
        for name in ("ttft", "itl"):
            assert 0 < row[f"median_{name}_ms"] <= row[f"p90_{name}_ms"] <= row[f"p99_{name}_ms"]
        assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["elapsed_s"])


def test_latency_table_names_machine_and_backend(runner, smollm2_dir):
    result = runner.invoke(main, ["bench", "latency", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--concurrency", "2", "--input-len", "4", "--output-len", "2"])
    assert result.exit_code == 0, result.output
    assert "cpu backend on" in result.output and "cores" in result.output
    assert "TTFT ms p50 / p90 / p99" in result.output and "\n          2  " in result.output


def test_chunked_prefill_spreads_the_prompt_and_whole_prompt_takes_one_step(runner, smollm2_dir):
    result = runner.invoke(main, ["bench", "chunked", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--streams", "2", "--stream-input-len", "4", "--long-input-len", "64",
                                  "--max-num-batched-tokens", "16", "--lead-steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    on, off = json.loads(result.output)["rows"]
    assert on["enable_chunked_prefill"] and not off["enable_chunked_prefill"]
    # chunked: the two decodes leave 14 tokens a step, so 64 prompt tokens take 5 steps; whole: one
    assert (on["steps"], off["steps"]) == (5, 1)
    assert (on["stream_tokens_during"], off["stream_tokens_during"]) == (2 * 5, 2 * 1)
    for row in (on, off):
        assert 0 < row["median_itl_ms"] <= row["p99_itl_ms"] <= row["max_stall_ms"]
        assert row["baseline_median_itl_ms"] > 0 and row["long_ttft_ms"] > 0


def test_percentiles_against_a_sorted_list():
    stamps = [[1.0, 1.5, 1.6, 3.0], [2.0, 2.1]]
    s = summarize([([1, 2], 4), ([3], 2)], stamps, start=0.5, elapsed=4.0)
    itl = sorted([0.5, 0.1, 1.4, 0.1])
    ttft = [0.5, 1.5]
    assert s["median_itl_ms"] == pytest.approx(1000 * (itl[1] + itl[2]) / 2)
    assert s["p90_itl_ms"] == pytest.approx(1000 * (itl[2] + 0.7 * (itl[3] - itl[2])))  # rank 0.9 * 3 = 2.7
    assert s["p99_ttft_ms"] == pytest.approx(1000 * (ttft[0] + 0.99 * (ttft[1] - ttft[0])))
    assert s["output_tok_s"] == 6 / 4.0 and np.isclose(s["median_ttft_ms"], 1000.0)


@pytest.mark.parametrize("text", ["", "0,8", "1,x", "-1"])
def test_bad_concurrency_is_refused(text):
    with pytest.raises(click.BadParameter, match="comma-separated list of positive integers"):
        parse_levels(text)
    assert parse_levels("1, 8,64") == [1, 8, 64]
