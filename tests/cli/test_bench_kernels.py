"""`cupaged bench kernels` without a GPU: the benchmark's own functions on the emulation device at
tiny shapes (the same CudaOps calls a GPU times, with time.perf_counter instead of CUDA events),
and the CLI's message where there is no CUDA device."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cupaged.backend.cuda import CudaOps
from cupaged.cli import bench_kernel_cases as bkc
from cupaged.cli import bench_kernels as bk
from cupaged.cli.main import main

pytest.importorskip("tests.emu.harness")
from tests.emu.device import EmuDevice  # noqa: E402

# Contexts 16 and 80 with 64-key partitions: one single-pass decode and one split + merge.
TINY = bk.Sweep(copy_mib=1, batches=(1, 2), contexts=(16, 80), q_heads=4, kv_heads=2, head_dim=64, block_size=16,
                norm_shape=(4, 256), gemm_tokens=(1, 4), gemm_weights=((64, 64), (96, 64)), gemm_square=64,
                mlp_tokens=(4,), intermediate=128, rotary_tokens=(4,), max_position=64, cache_tokens=(4,),
                repeats=2, warmup=1, inner=1)
KERNELS = {"copy", "decode_paged", "decode_contiguous", "rms_norm", "fused_add_rms_norm", "linear_square", "linear",
           "silu_and_mul", "rotary_embedding", "reshape_and_cache"}


@pytest.fixture(scope="module")
def emu_report():
    ops = CudaOps(EmuDevice(), "float16", partition_size=64)
    seen = []

    def progress(cases):
        for case in cases:
            seen.append(case.kernel)
            yield case

    report = bk.run_benchmark(ops, TINY, bk.HostTimer(), seed=0, progress=progress)
    return report, ops.device.launches, seen


def test_every_case_has_a_row_with_positive_numbers(emu_report):
    report, _, seen = emu_report
    rows = report["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert [r["kernel"] for r in rows] == seen  # each case went through the progress wrapper once
    decode = {(r["kernel"], r["params"]["batch"], r["params"]["context"]) for r in rows if "decode" in r["kernel"]}
    assert decode == {(k, b, c) for k in ("decode_paged", "decode_contiguous") for b in (1, 2) for c in (16, 80)}
    assert sum(r["kernel"] == "linear" for r in rows) == 4
    for r in rows:
        assert r["repeats"] == TINY.repeats and r["median_us"] > 0 and r["min_us"] > 0, r
        assert r["bytes"] > 0 and r["gb_s"] > 0, r
        if r["kernel"] != "copy":
            assert r["pct_copy_bw"] > 0, r
        if r["kernel"].startswith("linear") or "decode" in r["kernel"]:
            assert r["flops"] > 0 and r["tflops"] > 0, r
        if r["kernel"].startswith("linear"):
            assert r["pct_square_gemm"] > 0 and r["pct_peak"] is None, r  # the emulator is no known card
        if r["kernel"] == "decode_paged":
            assert r["vs_contiguous"] > 0
    assert report["copy_bandwidth_gb_s"] > 0 and report["square_gemm_tflops"] > 0
    assert report["device"].startswith("emu device on") and report["timer"] == "perf_counter"
    assert report["targets"]  # paged vs contiguous, for each decode shape
    assert all(t["target"].startswith("paged decode") for t in report["targets"])


def test_decode_bytes_count_kv_and_q_read(emu_report):
    row = next(r for r in emu_report[0]["rows"] if r["kernel"] == "decode_paged" and r["params"]["batch"] == 2
               and r["params"]["context"] == 80)
    assert row["bytes"] == 2 * (2 * 80 * 2 * 64) * 2 + 2 * 4 * 64 * 2


def test_timed_calls_run_the_engines_kernels(emu_report):
    launches = set(emu_report[1])
    for name in ("paged_decode_f16_d64_g2", "paged_decode_reduce_f16", "rms_norm_f16", "fused_add_rms_norm_f16",
                 "silu_and_mul_f16", "rotary_embedding_f16", "reshape_and_cache_f16"):
        assert name in launches


def test_report_is_json_and_a_table(emu_report):
    report = emu_report[0]
    back = json.loads(json.dumps(report))
    assert back["rows"] == report["rows"] and back["sweep"]["batches"] == [1, 2]
    table = bk.format_table(report)
    assert report["device"] in table and "copy bandwidth" in table
    for kernel in KERNELS:
        assert f"\n{kernel} " in table
    assert "of contiguous" in table and "targets" in table


def test_paged_tables_scatter_and_contiguous_ones_are_in_order():
    ops = CudaOps(EmuDevice(), "float16", partition_size=64)
    inputs = bkc.Inputs(ops, seed=0)
    tables = np.arange(12).reshape(3, 4)
    meta = bkc.ops_meta(inputs, tables=tables, seq_lens=np.array([64, 50, 1]), bs=16, rows=np.arange(3))
    assert meta.max_query_len == 1 and meta.max_seq_len == 64
    assert meta.slot_mapping.tolist() == [3 * 16 + 15, 7 * 16 + 1, 8 * 16]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3] and meta.block_tables.dtype == np.int32
    assert bkc.copies_for(10, 0) == 1 and bkc.copies_for(100, 100) == 2 and bkc.copies_for(1, 10**9) == 64


def test_peak_is_known_only_for_named_cards():
    assert bk.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bk.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bk.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bk.peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_cli_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr("cupaged.backend.cuda_available", lambda: False)
    result = CliRunner().invoke(main, ["bench", "kernels", "--quick", "--json"])
    assert result.exit_code == 1
    assert "no CUDA device: cupaged bench kernels needs a GPU" in result.output


def test_cli_help_is_complete():
    runner = CliRunner()
    assert "kernels" in runner.invoke(main, ["bench", "--help"]).output
    out = runner.invoke(main, ["bench", "kernels", "--help"]).output
    for option in ("--quick", "--json", "--out", "--dtype", "--repeats", "--seed", "bandwidth"):
        assert option in out
