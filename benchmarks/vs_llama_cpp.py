"""cupaged against llama.cpp on the CPU, same weights, one interleaved run: decode (one stream),
prefill (512 tokens), batched generation (16 and 64 streams) and peak RSS, per weight dtype.

llama.cpp is built from the llama-cpp-python sdist's vendored source (tools llama-bench,
llama-batched-bench, llama-quantize); its GGUFs are made from the default model's own GGUF (the one
cupaged converts): `llama-quantize --allow-requantize` to F32 gives exactly the float32 values
cupaged holds, and BF16 and Q8_0 from that F32 file.

    pip download --no-deps --no-binary :all: llama-cpp-python   # or fetch the sdist from PyPI
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF && \\
        cmake --build build -j2 --target llama-bench llama-batched-bench llama-quantize
    python benchmarks/vs_llama_cpp.py --llama-bin .../build/bin --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Each figure is the median of --repeats fresh processes, the two engines alternating, both on
--threads threads. Rows as in the issue: "decode" is one stream's generation tok/s (cupaged: 1 / its
median inter-token time, 32-token prompt + 128 new; llama.cpp: llama-bench tg128), "prefill" a
512-token prompt's tok/s (cupaged: 512 / time to first token; llama.cpp: llama-bench pp512), "N
streams" N requests of 128 + 128 tokens, generated tokens / wall time (llama-batched-bench: N *
128 / (prompt + generation time)), RSS the peak resident set of the process at 64 streams.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = {"float32": "F32", "bfloat16": "BF16", "q8_0": "Q8_0"}  # cupaged dtype -> llama.cpp GGUF type


def run(cmd: list[str]) -> tuple[str, float]:
    """stdout and the peak RSS in MiB of this one child (os.wait4 gives its own rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{err.read()[-2000:]}")
        return out.read(), usage.ru_maxrss / 1024


def cupaged(dtype: str, threads: int, n: int, input_len: int, output_len: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "cupaged.cli.main", "bench", "throughput", "--backend", "cpu", "--dtype", dtype,
           "-n", str(n), "--concurrency", str(n), "--input-len", str(input_len), "--output-len", str(output_len),
           "--json"]
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    text, rss = run(cmd)
    return json.loads(text.strip().splitlines()[-1]), rss


def cupaged_row(row: str, dtype: str, threads: int) -> tuple[float, float]:
    if row == "decode":
        r, rss = cupaged(dtype, threads, 1, 32, 128)
        return 1000 / r["median_itl_ms"], rss
    if row == "prefill":
        r, rss = cupaged(dtype, threads, 1, 512, 1)
        return 512 / (r["median_ttft_ms"] / 1000), rss
    r, rss = cupaged(dtype, threads, int(row.split()[0]), 128, 128)
    return r["output_tok_s"], rss


def llama_row(row: str, gguf: Path, bin_dir: Path, threads: int) -> tuple[float, float]:
    if row in ("decode", "prefill"):
        test = ["-p", "0", "-n", "128"] if row == "decode" else ["-p", "512", "-n", "0"]
        text, rss = run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
                         *test])
        return json.loads(text)[0]["avg_ts"], rss
    n = int(row.split()[0])
    text, rss = run([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-c",
                     str(n * 256 + 256), "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", str(n),
                     "--output-format", "jsonl"])
    r = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    return n * 128 / (r["t_pp"] + r["t_tg"]), rss


def make_ggufs(source: Path, bin_dir: Path, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for kind, src in (("F32", source), ("BF16", None), ("Q8_0", None)):
        path = out_dir / f"{source.stem.split('.')[0]}.{kind}.gguf"
        if not path.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src or made["F32"]), str(path),
                            kind], check=True, capture_output=True)
        made[kind] = path
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True, help="llama.cpp's build/bin")
    ap.add_argument("--gguf", type=Path, required=True, help="the default model's GGUF (the Q4_1 cupaged converts)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/vs-llama-cpp"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rows", nargs="+", default=["decode", "prefill", "16 streams", "64 streams"])
    args = ap.parse_args()
    ggufs = make_ggufs(args.gguf, args.llama_bin, args.work_dir)
    from cupaged.cli.bench import machine_name
    print(f"{machine_name()}, {args.threads} threads, medians of {args.repeats} fresh processes, alternating")
    print(f"{'dtype':9} {'row':11} {'cupaged':>9} {'llama.cpp':>10} {'ratio':>6} {'RSS cupaged':>12} {'llama.cpp':>10}")
    for dtype in args.dtypes:
        for row in args.rows:
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(cupaged_row(row, dtype, args.threads))
                theirs.append(llama_row(row, ggufs[DTYPES[dtype]], args.llama_bin, args.threads))
            a, b = (statistics.median(v for v, _ in runs) for runs in (ours, theirs))
            ra, rb = (statistics.median(r for _, r in runs) for runs in (ours, theirs))
            print(f"{dtype:9} {row:11} {a:9.1f} {b:10.1f} {a / b:6.2f} {ra:12.0f} {rb:10.0f}", flush=True)


if __name__ == "__main__":
    main()
