"""`cupaged bench memory` through click's runner: the table, the JSON, the PNG, and clear errors."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from cupaged.cli.main import main

SMALL = ["bench", "memory", "--num-requests", "60", "--rate", "40", "--kv-tokens", "4096", "--max-model-len", "512"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_table_and_plot(runner, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "memory.png"
    result = runner.invoke(main, SMALL + ["--plot", str(png)])
    assert result.exit_code == 0, result.output
    for name in ("paged-8", "paged-16", "paged-32", "contiguous", "waste mean", "peak reqs"):
        assert name in result.output
    assert "no request has n > 1" in result.output and "no request has a prefix_id" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in result.output


def test_json_report_agrees_with_itself(runner):
    result = runner.invoke(main, SMALL + ["--n", "3", "--no-plot", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {r["memory"]: r for r in report["rows"]}
    assert list(rows) == ["paged-8", "paged-16", "paged-32", "contiguous"]
    assert report["trace"]["requests"] == 60 and report["trace"]["sequences"] == 180
    # 4096 tokens hold 8 contiguous 512-token slots; a 3-sample request takes 3 of them
    assert rows["contiguous"]["peak_requests"] <= 2 < rows["paged-16"]["peak_requests"]
    assert rows["contiguous"]["preemptions"] == 0 and rows["contiguous"]["peak_reserved_tokens"] <= 4096
    for r in rows.values():
        assert 0 <= r["waste_mean_pct"] < 100 and r["mean_requests"] <= r["peak_requests"]
    sharing = report["sharing"]
    assert sharing["fork"] == rows["paged-16"] and sharing["copies"]["saved_blocks_peak"] == 0
    assert sharing["fork"]["saved_blocks_peak"] > 0 and 0 < sharing["fork"]["saved_pct"] < 100


def test_prefix_cache_reuse_stays_within_the_trace(runner):
    result = runner.invoke(main, SMALL + ["--n", "3", "--prefix-len", "40", "--rate", "400", "--kv-tokens", "2048",
                                          "--no-plot", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    prefix, trace = report["prefix_cache"], report["trace"]
    assert prefix["preemptions"] > 0 and prefix["readmissions"] == prefix["preemptions"]
    assert prefix["first_admission_tokens"] == trace["prompt_tokens"]
    assert prefix["first_admission_reused"] <= 40 // 16 * 16 * trace["with_prefix"] <= trace["prompt_tokens"]
    assert prefix["prefix_cache_hits"] == prefix["first_admission_reused"] + prefix["readmitted_reused"]
    assert prefix["hit_rate_pct"] == pytest.approx(100 * prefix["first_admission_reused"] / trace["prompt_tokens"])
    table = runner.invoke(main, SMALL + ["--n", "3", "--prefix-len", "40", "--rate", "400", "--kv-tokens", "2048",
                                         "--no-plot"]).output
    for words in (f"first admissions reused {prefix['first_admission_reused']} of their {trace['prompt_tokens']} "
                  "prompt tokens", f"{prefix['readmissions']} re-admissions after preemption",
                  "preempted: preemptions by recompute", "drained: replay time", "at peak: the same"):
        assert words in table


def test_trace_file_and_its_errors(runner, tmp_path):
    good = tmp_path / "trace.jsonl"
    good.write_text("\n".join(json.dumps({"arrival": 0.1 * i, "input_len": 30 + i, "output_len": 20})
                              for i in range(10)) + "\n")
    result = runner.invoke(main, ["bench", "memory", "--trace", str(good), "--kv-tokens", "2048",
                                  "--max-model-len", "256", "--no-plot", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["trace"]["requests"] == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival": 0, "input_len": 30, "output_len": 20}\n{"arrival": 0, "input_len": -3}\n')
    result = runner.invoke(main, ["bench", "memory", "--trace", str(bad), "--no-plot"])
    assert result.exit_code == 1 and "bad.jsonl line 2: missing 'output_len'" in result.output


def test_without_matplotlib_says_how_to_install(runner, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(main, SMALL + ["--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "pip install 'cupaged[bench]'" in result.output
    assert not (tmp_path / "x.png").exists()


def test_help_lists_the_new_benchmarks(runner):
    out = runner.invoke(main, ["bench", "--help"]).output
    for command in ("latency", "chunked", "memory", "throughput", "startup", "kernels"):
        assert command in out
    memory_help = runner.invoke(main, ["bench", "memory", "--help"]).output
    for option in ("--trace", "--kv-tokens", "--max-model-len", "--rate", "--n", "--plot", "--json"):
        assert option in memory_help
