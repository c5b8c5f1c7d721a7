"""`cupaged bench latency` and `cupaged bench chunked` on SmolLM2 (CPU) at tiny sizes: the reports'
counts follow from the workload and the scheduler's rules; no timing is asserted."""
from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cupaged.cli.bench import summarize
from cupaged.cli.bench_latency import parse_levels, split_gaps
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
    # 2 streams of 12 tokens under a 16-token budget: the second stream's prefill ends in the second
    # step (chunked: 4 + 8 tokens; whole: it waits a step), so "before" starts after that step
    result = runner.invoke(main, ["bench", "chunked", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--streams", "2", "--stream-input-len", "12", "--long-input-len", "64",
                                  "--max-num-batched-tokens", "16", "--lead-steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    on, off = report["rows"]
    assert on["enable_chunked_prefill"] and not off["enable_chunked_prefill"] and report["lead_steps"] == 3
    # chunked: the two decodes leave 14 tokens a step, so 64 prompt tokens take 5 steps; whole: one
    assert (on["steps"], off["steps"]) == (5, 1)
    assert (on["stream_tokens_during"], off["stream_tokens_during"]) == (2 * 5, 2 * 1)
    # one gap per stream per lead decode step, none from the steps that prefill a stream
    assert on["stream_tokens_before"] == off["stream_tokens_before"] == 2 * 3
    for row in (on, off):
        assert 0 < row["median_itl_ms"] <= row["p99_itl_ms"] <= row["max_stall_ms"]
        assert row["before_median_itl_ms"] > 0 and row["long_ttft_ms"] > 0 and row["cpu_cores_used"] > 0


def test_chunked_table_says_what_each_column_is(runner, smollm2_dir):
    result = runner.invoke(main, ["bench", "chunked", "--model", str(smollm2_dir), "--backend", "cpu",
                                  "--streams", "2", "--stream-input-len", "4", "--long-input-len", "32",
                                  "--max-num-batched-tokens", "16", "--lead-steps", "2"])
    assert result.exit_code == 0, result.output
    for words in ("before p50: the streams' median gap over the 2 decode steps before the prompt arrived (4 / 4)",
                  "after every stream's own prefill", "steps: engine steps from the long prompt's arrival",
                  "ITL p50 / p99, max stall: the streams' gaps between tokens that end in those steps (6 / 2)",
                  "prompt TTFT: from the long prompt's arrival", "cores over the timed steps"):
        assert words in result.output


def test_split_gaps_against_a_hand_count():
    # stream a's first token at 1.0, b's at 2.0 (b still prefilling in the step that ends at 2.0);
    # the long prompt arrives at 4.5
    a = [1.0, 2.0, 3.0, 4.0, 6.0, 7.5]
    b = [2.0, 3.1, 4.2, 6.0, 7.5]
    before, during = split_gaps([a, b], arrival=4.5)
    # before: gaps starting at or after 2.0 (both have a token) and ending by 4.5; a's 1.0 -> 2.0 holds b's prefill
    assert sorted(before) == pytest.approx(sorted([3.0 - 2.0, 4.0 - 3.0, 3.1 - 2.0, 4.2 - 3.1]))
    # during: gaps ending after 4.5, including the ones that straddle the arrival
    assert sorted(during) == pytest.approx(sorted([6.0 - 4.0, 7.5 - 6.0, 6.0 - 4.2, 7.5 - 6.0]))
    assert all(gap > 0 for gap in before + during)
    assert len(before) + len(during) == len(a) - 1 + len(b) - 1 - 1  # only a's prefill-laden gap is left out


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
