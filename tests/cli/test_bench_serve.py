"""`cupaged bench serve` through click's runner: a small load at two rates gives a row each with the
measured figures, and a bad --rates is refused before anything loads."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cupaged.cli.main import main
from tests.api.test_generate import BLOCK_BYTES


def test_rows_per_rate(smollm2_dir):
    result = CliRunner().invoke(main, ["bench", "serve", "-m", str(smollm2_dir), "--backend", "cpu",
                                       "--kv-cache-memory", str(64 * BLOCK_BYTES), "--max-model-len", "256",
                                       "--requests", "3", "--rates", "50,inf", "--input-len", "8",
                                       "--output-len", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])["rows"]
    assert [r["rate"] for r in rows] == [50.0, float("inf")]
    for r in rows:
        assert r["requests"] == 3 and r["out_tok_per_s"] > 0
        assert r["p50_ttft_ms"] > 0 and r["p99_health_ms"] >= r["p50_health_ms"] > 0


def test_bad_rates_are_refused():
    result = CliRunner().invoke(main, ["bench", "serve", "--rates", "fast"])
    assert result.exit_code == 2 and "--rates" in result.output
    result = CliRunner().invoke(main, ["bench", "serve", "--rates", "0"])
    assert result.exit_code == 2 and "> 0" in result.output
