"""The GPU suite's prewarm stage: compile every cuda/*.cu with NVRTC, in parallel, into CuPy's on-disk
kernel cache, both as CupyDevice loads it (headers spliced) and as the GPU test grid does (`-I`), so the
stages after it find every module compiled. One JSON line per module.

    python3 -m tests.gpu.prewarm [--jobs N]          # on the device: the exact RawModule cache entries
    python3 -m tests.gpu.prewarm --offline sm_90     # no device: the same sources and options, arch given

`--offline` is the dry run: it compiles what RawModule would through tests/cuda/test_nvrtc_offline.py
(which caches its own results, not CuPy's). Exits 1 if any module failed to compile.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("device", "grid")


def compile_on_device(file: str, path: str) -> dict:
    from cupaged.backend.cupy_device import _raw_module
    from cupaged.backend.kernels import NVRTC_OPTIONS
    from tests.emu.gpu import load_gpu_module

    module = _raw_module(file, NVRTC_OPTIONS) if path == "device" else load_gpu_module(ROOT / "cuda" / file)._raw
    module.compile()
    return {"ok": True}


def compile_offline(file: str, path: str, arch: str) -> dict:
    from tests.cuda.test_nvrtc_offline import compile_one
    res = compile_one(ROOT / "cuda" / file, path, arch)
    return {"ok": res["ok"], "kernels": len(res["kernels"]), **({} if res["ok"] else {"log": res["log"][-2000:]})}


def one(job: tuple[str, str, str | None]) -> dict:
    file, path, arch = job
    t0 = time.perf_counter()
    try:
        res = compile_offline(file, path, arch) if arch else compile_on_device(file, path)
    except Exception as e:  # a CompileException carries NVRTC's log
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    return {"module": file, "source": path, **({"arch": arch} if arch else {}), **res,
            "s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--offline", metavar="ARCH", help="compile without a device for this arch (sm_80, sm_90)")
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args(argv)
    jobs = [(src.name, path, args.offline) for src in sorted((ROOT / "cuda").glob("*.cu")) for path in PATHS]
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(one, jobs):
            failed += not record["ok"]
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
