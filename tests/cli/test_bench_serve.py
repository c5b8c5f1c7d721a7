"""`cupaged bench serve` through click's runner: a small load at two rates gives a row each whose
counts agree with the workload; --base-url measures a server already running (here the server tests'
one, with its API key) without loading a model; a JSONL dataset's lengths are what the server
generates; bad options and bad dataset lines are refused with the problem named."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cupaged.cli.main import main
from tests.api.test_generate import BLOCK_BYTES
from tests.server.conftest import API_KEY, MODEL, served  # noqa: F401 (the running server fixture)

LOCAL = ["--backend", "cpu", "--kv-cache-memory", str(64 * BLOCK_BYTES), "--max-model-len", "256"]


def bench(*args) -> dict:
    result = CliRunner().invoke(main, ["bench", "serve", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_rows_per_rate(smollm2_dir, tmp_path):
    out = tmp_path / "result.json"
    report = bench("-m", str(smollm2_dir), *LOCAL, "--requests", "3", "--request-rate", "50,inf", "--input-len", "8",
                   "--output-len", "3", "--max-concurrency", "2", "--result-file", str(out))
    assert json.loads(out.read_text()) == report
    assert [r["rate"] for r in report["rows"]] == [50.0, float("inf")]
    for r in report["rows"]:
        assert r["requests"] == 3 and r["failed"] == 0 and r["output_tokens"] == 9 and r["max_concurrency"] == 2
        assert r["p99_ttft_ms"] >= r["p90_ttft_ms"] >= r["p50_ttft_ms"] > 0
        assert r["p50_e2e_ms"] >= r["p50_ttft_ms"] and r["p99_health_ms"] >= r["p50_health_ms"] > 0


def test_base_url_measures_a_running_server(served):
    report = bench("--base-url", served.base_url + "/v1", "--api-key", API_KEY, "--requests", "4",
                   "--request-rate", "inf", "--input-len", "6", "--output-len", "4", "--range-ratio", "0.5",
                   "--vocab-size", "49000")
    assert report["model"] == MODEL and report["backend"] is None
    (row,) = report["rows"]
    assert row["failed"] == 0 and 4 * 2 <= row["output_tokens"] <= 4 * 6  # lengths drawn from [2, 6]


def test_jsonl_dataset(served, tmp_path):
    data = tmp_path / "load.jsonl"
    data.write_text('{"prompt": "Hello", "output_len": 2}\n\n{"prompt": [1, 2, 3], "max_tokens": 5}\n')
    report = bench("--base-url", served.base_url, "--api-key", API_KEY, "--dataset", str(data), "--requests", "4",
                   "--request-rate", "inf")
    assert report["rows"][0]["output_tokens"] == 2 + 5 + 2 + 5  # the file's two lines, twice


def test_bad_options_and_dataset_lines_are_refused(tmp_path):
    result = CliRunner().invoke(main, ["bench", "serve", "--request-rate", "fast"])
    assert result.exit_code == 2 and "--request-rate" in result.output
    result = CliRunner().invoke(main, ["bench", "serve", "--request-rate", "0"])
    assert result.exit_code == 2 and "> 0" in result.output
    bad = tmp_path / "bad.jsonl"
    for line, words in (('{"prompt": "x", "output_len": 0}', "output_len must be an integer >= 1"),
                        ('{"text": "x"}', "not a JSON object with a prompt"), ("[1, 2", "not a JSON object")):
        bad.write_text(line + "\n")
        result = CliRunner().invoke(main, ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--served-model-name",
                                           "m", "--dataset", str(bad)])
        assert result.exit_code == 2 and f"{bad}:1" in result.output and words in result.output, result.output
