"""scripts/gpu_suite.sh --dry-run on the emulation device: every stage runs and passes, and each leaves
its results in $OUT, so the first GPU machine it meets runs a script already exercised here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_passes_every_stage(tmp_path, smollm2_dir):
    from cupaged.weights.random_model import export_files
    carry = tmp_path / "carry"
    export_files(smollm2_dir, carry / "smollm2-files")
    (carry / "wheels").mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "CARRY": str(carry), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", "scripts/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["setup", "prewarm", "smoke", "kernels", "engine", "bench"]
    assert all(s["status"] == 0 for s in stages), stages
    smoke = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert smoke[-1] == {"check": "summary", "ok": True, "failed": 0}
    assert {r["check"] for r in smoke} >= {"linear", "linear_bias", "paged_attention_decode", "swap", "graph"}
    for n, name in enumerate(["setup", "prewarm", "smoke", "kernels", "engine", "bench"], 1):
        assert (out / f"{n}-{name}.log").stat().st_size > 0
    assert (tmp_path / "cupaged-random-smollm2" / "model.safetensors").is_file()
