"""`cupaged bench kernels`: each CUDA kernel's time, GB/s or TF/s, against the device's own copy bandwidth.

What is timed is what the engine runs: the public `CudaOps` methods (checks, output allocation,
launches, the split-K merge of long decodes, the cuBLAS GEMM), with `AttnMetadata` built here.
Every case is a function of the call index `i`; a case whose working set is smaller than twice
the device's L2 cache rotates through enough disjoint copies of its inputs (`i % copies`) that
each call reads from memory, not from L2 (for paged decode: disjoint block sets of one pool).

Timing is a `timer(fn, repeats, warmup) -> [seconds per call]`:
- `CudaEventTimer` (a GPU): before each repeat a one-thread kernel spins on %globaltimer for longer
  than the host needs to enqueue the repeat's calls, so they run back to back on the device and the
  CUDA events between them measure device time, not Python launch overhead.
- `HostTimer` (the emulation device in the tests): time.perf_counter around each call.

Byte counts are what each op must move (reads + writes), except decode attention, which counts
the bytes of K/V and Q read, as the performance targets of the kernels issue do.

    cupaged bench kernels --out bench-kernels.json      # on a GPU
    run_benchmark(CudaOps(EmuDevice(), "float16", partition_size=64), TINY_SWEEP, HostTimer())
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import click
import numpy as np

from cupaged.cli.bench_kernel_cases import Case, Inputs, build_cases

# Dense fp16 tensor-core peak with fp32 accumulation (NVIDIA datasheets), TF/s, by device-name substring.
# Checked in order: the first match wins.
PEAK_FP16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0))

SPIN_SOURCE = r"""
extern "C" __global__ void cupaged_bench_spin(long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while ((long long)(t - t0) < ns);
}
"""


@dataclass(frozen=True)
class Sweep:
    """The shapes to measure. FULL follows the issue's targets (Llama-3-8B-like layers)."""

    copy_mib: int = 1024                        # the device-to-device copy that sets the reference GB/s
    batches: tuple[int, ...] = (1, 8, 64)       # decode attention: batch x context
    contexts: tuple[int, ...] = (512, 4096)
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    norm_shape: tuple[int, int] = (4096, 4096)  # rms_norm, fused_add_rms_norm: [T, H]
    gemm_tokens: tuple[int, ...] = (1, 16, 256)
    gemm_weights: tuple[tuple[int, int], ...] = ((4096, 4096), (14336, 4096), (4096, 14336))  # [N, K]
    gemm_square: int = 8192                     # one large square GEMM: the measured cuBLAS ceiling
    mlp_tokens: tuple[int, ...] = (256, 4096)   # silu_and_mul: [T, 2I]
    intermediate: int = 14336
    rotary_tokens: tuple[int, ...] = (256, 4096)
    max_position: int = 8192
    cache_tokens: tuple[int, ...] = (64, 4096)  # reshape_and_cache: 64 decode rows, a 4096-token prefill
    repeats: int = 50
    warmup: int = 5
    inner: int = 10                             # calls per timed repeat (back to back on the device)


FULL = Sweep()
QUICK = Sweep(copy_mib=256, batches=(1, 64), gemm_tokens=(1, 256), gemm_weights=((4096, 4096), (14336, 4096)),
              gemm_square=4096, mlp_tokens=(256,), rotary_tokens=(256,), cache_tokens=(64,), repeats=10, warmup=2,
              inner=5)


# ---- timers --------------------------------------------------------------------------------------
class HostTimer:
    """time.perf_counter around each call, after `sync()` (a no-op for a synchronous device)."""

    name = "perf_counter"

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync or (lambda: None)

    def __call__(self, fn: Callable[[int], Any], repeats: int, warmup: int) -> list[float]:
        for i in range(warmup):
            fn(i)
        self.sync()
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            fn(warmup + r)
            self.sync()
            times.append(time.perf_counter() - start)
        return times


class CudaEventTimer:
    """CUDA events around `inner` back-to-back calls per repeat, on CuPy's current stream.

    A spin kernel queued before the start event keeps the device busy for twice the host's
    measured enqueue time of those calls (+ 50 us), so by the time the first timed kernel starts
    all of them are queued: the events measure device time, and a cheap kernel is not measured
    as the Python overhead of launching it. Each repeat ends with a sync (the queue never fills)."""

    name = "cuda-events"

    def __init__(self, inner: int = 10):
        import cupy

        self.cupy = cupy
        self.inner = max(1, int(inner))
        self._spin = cupy.RawKernel(SPIN_SOURCE, "cupaged_bench_spin")

    def spin(self, seconds: float) -> None:
        self._spin((1,), (1,), (np.int64(min(seconds, 0.2) * 1e9),))

    def __call__(self, fn: Callable[[int], Any], repeats: int, warmup: int) -> list[float]:
        cp, inner = self.cupy, self.inner
        stream = cp.cuda.get_current_stream()
        for i in range(max(1, warmup)):
            fn(i)
        stream.synchronize()
        start = time.perf_counter()
        for i in range(inner):
            fn(i)
        host = time.perf_counter() - start  # the enqueue time of `inner` calls (the device may lag behind)
        stream.synchronize()
        times, i = [], 0
        for _ in range(repeats):
            self.spin(2 * host + 50e-6)
            begin, end = cp.cuda.Event(), cp.cuda.Event()
            begin.record(stream)
            for _ in range(inner):
                fn(i)
                i += 1
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(begin, end) / 1e3 / inner)
        return times


def device_info(ops) -> dict:
    """The device's name and L2 size: CuPy's properties on a GPU, else the device seam's name and the host."""
    if getattr(ops.device, "name", "") == "cupy":
        import cupy
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return dict(name=name, l2_bytes=int(dev.attributes.get("L2CacheSize", 0)),
                    compute_capability=str(dev.compute_capability), cupy=cupy.__version__,
                    cuda_runtime=int(cupy.cuda.runtime.runtimeGetVersion()))
    from cupaged.cli.bench import machine_name
    return dict(name=f"{ops.device.name} device on {machine_name()}", l2_bytes=0)


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_FP16_TFLOPS if key in device_name), None)


def measure(case: Case, timer, sw: Sweep) -> dict:
    fn = case.setup()
    times = np.asarray(timer(fn, sw.repeats, sw.warmup), dtype=np.float64)
    del fn
    med = float(np.median(times))
    p10, p90 = (float(v) for v in np.percentile(times, [10, 90]))
    row = dict(kernel=case.kernel, shape=case.shape, params=case.params, repeats=len(times),
               median_us=med * 1e6, min_us=float(times.min()) * 1e6, p10_us=p10 * 1e6, p90_us=p90 * 1e6,
               spread_pct=100 * (p90 - p10) / med if med > 0 else 0.0, bytes=case.bytes, flops=case.flops)
    row["gb_s"] = case.bytes / med / 1e9 if case.bytes and med > 0 else None
    row["tflops"] = case.flops / med / 1e12 if case.flops and med > 0 else None
    return row


def run_benchmark(ops, sw: Sweep, timer, seed: int = 0, progress: Callable[[list[Case]], Any] | None = None) -> dict:
    """Measure every case of `sw` on `ops` (a CudaOps) with `timer`; returns the report (JSON-ready).

    progress: wraps the case list for display (click.progressbar in the CLI), or None."""
    info = device_info(ops)
    cases = build_cases(ops, sw, Inputs(ops, seed), info["l2_bytes"])
    rows = []
    for case in (progress(cases) if progress else cases):
        rows.append(measure(case, timer, sw))
    copy_gb_s = rows[0]["gb_s"]
    square = next(r["tflops"] for r in rows if r["kernel"] == "linear_square")
    peak = peak_tflops(info["name"])
    for r in rows:
        r["pct_copy_bw"] = 100 * r["gb_s"] / copy_gb_s if r["gb_s"] and r["kernel"] != "copy" else None
        r["pct_peak"] = 100 * r["tflops"] / peak if r["tflops"] and peak else None
        r["pct_square_gemm"] = 100 * r["tflops"] / square if r["tflops"] and r["kernel"].startswith("linear") else None
    contiguous = {(r["params"]["batch"], r["params"]["context"]): r["median_us"]
                  for r in rows if r["kernel"] == "decode_contiguous"}
    for r in rows:
        if r["kernel"] == "decode_paged":
            r["vs_contiguous"] = r["median_us"] / contiguous[(r["params"]["batch"], r["params"]["context"])]
    report = dict(device=info["name"], device_info=info, backend=ops.name, dtype=ops.dtype_name,
                  partition_size=ops.partition_size, timer=timer.name, seed=seed, sweep=asdict(sw),
                  copy_bandwidth_gb_s=copy_gb_s, square_gemm_tflops=square, peak_fp16_tflops=peak, rows=rows)
    report["targets"] = check_targets(report)
    return report


def check_targets(report: dict) -> list[dict]:
    """The kernels issue's performance targets, for the rows this sweep measured."""
    out = []

    def find(kernel, **params):
        return next((r for r in report["rows"] if r["kernel"] == kernel
                     and all(r["params"].get(k) == v for k, v in params.items())), None)

    gqa = dict(q_heads=32, kv_heads=8, head_dim=128)
    for ctx, goal in ((4096, 80.0), (512, 50.0)):
        if r := find("decode_paged", batch=64, context=ctx, **gqa):
            out.append(dict(target=f"decode B=64 ctx={ctx} >= {goal:.0f}% of copy bandwidth",
                            value=r["pct_copy_bw"], goal=goal, met=r["pct_copy_bw"] >= goal))
    for r in report["rows"]:
        if r["kernel"] == "decode_paged":
            p = r["params"]
            out.append(dict(target=f"paged decode B={p['batch']} ctx={p['context']} within 10% of contiguous",
                            value=r["vs_contiguous"], goal=1.10, met=r["vs_contiguous"] <= 1.10))
    for kernel in ("rms_norm", "fused_add_rms_norm"):
        if (r := find(kernel, tokens=4096, hidden=4096)) is not None:
            out.append(dict(target=f"{kernel} 4096x4096 >= 80% of copy bandwidth", value=r["pct_copy_bw"],
                            goal=80.0, met=r["pct_copy_bw"] >= 80.0))
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def format_table(report: dict) -> str:
    """The report as a plain-text table: one row per case, then the targets."""
    sw = report["sweep"]
    lines = [f"cupaged bench kernels on {report['device']} ({report['dtype']}, {report['timer']}, "
             f"median of {sw['repeats']} x {sw['inner']} calls, seed {report['seed']})",
             f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s (read + write); square GEMM "
             f"{report['square_gemm_tflops']:.1f} TF/s; datasheet fp16 peak "
             + (f"{report['peak_fp16_tflops']:.0f} TF/s" if report["peak_fp16_tflops"] else "unknown"),
             "",
             f"{'kernel':20s} {'shape':34s} {'median us':>10s} {'spread':>7s} {'GB/s':>8s} {'% copy':>7s} "
             f"{'TF/s':>7s} {'% peak':>7s}  note"]
    for r in report["rows"]:
        note = f"x{r['vs_contiguous']:.2f} of contiguous" if "vs_contiguous" in r else ""
        if r["kernel"].startswith("linear") and r["pct_square_gemm"] is not None:
            note = f"{r['pct_square_gemm']:.0f}% of square GEMM"
        lines.append(f"{r['kernel']:20s} {r['shape']:34s} {r['median_us']:10.1f} {r['spread_pct']:6.1f}% "
                     f"{_fmt(r['gb_s'], '8.1f'):>8s} {_fmt(r['pct_copy_bw'], '6.1f'):>7s} "
                     f"{_fmt(r['tflops'], '7.2f'):>7s} {_fmt(r['pct_peak'], '6.1f'):>7s}  {note}".rstrip())
    if report["targets"]:
        lines += ["", "targets (cuda kernels issue):"]
        for t in report["targets"]:
            lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.2f}")
    return "\n".join(lines)


@click.command("kernels")
@click.option("--quick", is_flag=True, help="A smaller sweep with fewer repeats (a quick look, not for the record).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True,
              help="Storage dtype of activations, weights and the KV cache.")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed repeats per case (default: 50, or 10 with --quick).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON report to this file.")
def kernels(quick, dtype, repeats, seed, as_json, out):
    """Each CUDA kernel's time, GB/s or TF/s, against this device's measured copy bandwidth.

    Measures a large device-to-device copy (the reference GB/s), paged decode attention over
    batch x context (paged block tables against contiguous ones), rms_norm and fused add+rms_norm,
    the cuBLAS GEMM at LLM shapes (TF/s, % of the datasheet fp16 peak where the card is known),
    silu_and_mul, rotary and reshape_and_cache, all through the CudaOps methods the engine calls.
    Times are CUDA events around back-to-back calls: median of the repeats, spread = p90 - p10.
    Needs CuPy and a GPU.
    """
    import sys

    from cupaged.backend import cuda_available
    if not cuda_available():
        raise click.ClickException("no CUDA device: cupaged bench kernels needs a GPU")
    from cupaged.backend.cuda import CudaOps
    sw = QUICK if quick else FULL
    if repeats is not None:
        sw = Sweep(**{**asdict(sw), "repeats": repeats})
    ops = CudaOps(dtype=dtype)

    def progress(cases):  # on stderr, so that --json keeps stdout clean
        with click.progressbar(cases, label="bench kernels", file=sys.stderr,
                               item_show_func=lambda c: c and f"{c.kernel} {c.shape}") as bar:
            yield from bar

    report = run_benchmark(ops, sw, CudaEventTimer(sw.inner), seed=seed, progress=progress)
    report["quick"] = quick
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    click.echo(text if as_json else format_table(report))
