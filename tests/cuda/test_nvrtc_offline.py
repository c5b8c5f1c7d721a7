"""NVRTC without a GPU: every cuda/*.cu compiles the way `cupy.RawModule(code=...)` would compile it on
the device, for sm_80 and sm_90, with no driver and no device.

nvcc (tests/cuda/test_nvcc.py) finds the host's C headers, NVRTC does not: a source can pass nvcc CI
and fail on the first GPU it meets. So this compiles both sources the project hands NVRTC: the one
`CupyDevice` builds (local headers spliced in, `kernels.NVRTC_OPTIONS`) and the GPU test grid's
(the file as it is, with `-I` its folder: `tests.emu.gpu.nvrtc_options`). The options are RawModule's
own: `assemble_cupy_compiler_options`, then `-ftz=true` and the arch, then
`--device-as-default-execution-space`, as `cupy.cuda.compiler` adds them; only the arch is ours
(CuPy asks the device for it, which needs a driver). Each cubin must hold every extern "C" kernel,
and ptxas must report no spill and no stack frame outside test_nvcc.STACK_ALLOWLIST.

Needs `cupy-cuda13x` and the `nvidia-cuda-nvrtc` wheel (the test extra installs both); results are
cached on disk like nvcc's, by source, options and NVRTC version.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

from tests.cuda.test_nvcc import ARCHS, SOURCES, STACK_ALLOWLIST, _cache_dir, parse_ptxas
from tests.emu import gpu
from tests.emu.harness import find_kernels

PATHS = ("device", "grid")  # CupyDevice's spliced source / the GPU test grid's source with -I


def source_and_options(src: Path, path: str) -> tuple[str, tuple[str, ...]]:
    """The (code, options) that path hands RawModule for src."""
    if path == "device":
        from cupaged.backend.cupy_device import inline_headers
        from cupaged.backend.kernels import NVRTC_OPTIONS
        return inline_headers(src.name), NVRTC_OPTIONS
    return src.read_text(), gpu.nvrtc_options(src, None)


def rawmodule_options(options: tuple[str, ...], arch: str) -> tuple[str, ...]:
    """What cupy.cuda.compiler turns RawModule's options into, with the arch given instead of asked for."""
    from cupy._core import core
    return (*core.assemble_cupy_compiler_options(tuple(options)), "-ftz=true", f"-arch={arch}",
            "--device-as-default-execution-space", "-Xptxas=-v")


@lru_cache(maxsize=1)
def nvrtc_version() -> str:
    from cupy.cuda import nvrtc
    return ".".join(map(str, nvrtc.getVersion()))


def compile_one(src: Path, path: str, arch: str) -> dict:
    """{'ok', 'log', 'kernels' (ptxas -v per function), 'symbols' (the cubin's functions)}; cached on disk."""
    from cupy.cuda import compiler

    code, options = source_and_options(src, path)
    options = rawmodule_options(options, arch)
    key = hashlib.sha256("\0".join([code, *options, nvrtc_version()]).encode()).hexdigest()[:24]
    cached = _cache_dir() / f"nvrtc-{src.stem}-{path}-{arch}-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    log = io.StringIO()
    try:
        cubin, _ = compiler._NVRTCProgram(code, src.name, method="cubin").compile(options, log_stream=log)
    except compiler.CompileException as e:
        return {"ok": False, "log": str(e), "kernels": {}, "symbols": []}
    result = {"ok": True, "log": log.getvalue(), "kernels": parse_ptxas(log.getvalue()),
              "symbols": sorted(elf_functions(cubin))}
    cached.write_text(json.dumps(result))
    return result


def elf_functions(image: bytes) -> set[str]:
    """Names of the function symbols (STT_FUNC) in a 64-bit little-endian ELF image (a cubin)."""
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name_at, info = struct.unpack_from("<IB", image, at)
            if info & 0xF == 2:  # STT_FUNC
                end = image.index(b"\0", strtab + name_at)
                names.add(image[strtab + name_at:end].decode())
    return names


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("cupy", reason="the NVRTC check needs cupy-cuda13x (pip install -e '.[test]')")
    try:
        nvrtc_version()
    except Exception as e:  # CuPy without the NVRTC library (the nvidia-cuda-nvrtc wheel)
        pytest.skip(f"NVRTC is not loadable: {type(e).__name__}: {e}")
    jobs = [(src, path, arch) for src in SOURCES for path in PATHS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        done = list(pool.map(lambda job: compile_one(*job), jobs))
    return {(src.name, path, arch): res for (src, path, arch), res in zip(jobs, done)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("src", SOURCES, ids=[s.name for s in SOURCES])
def test_nvrtc_compiles_every_kernel_without_spills(results, src: Path, path: str, arch: str):
    res = results[(src.name, path, arch)]
    assert res["ok"], f"NVRTC failed on {src.name} ({path} source) for {arch}:\n{res['log']}"
    missing = set(find_kernels(src.read_text())) - set(res["symbols"])
    assert not missing, f"{src.name} ({path}, {arch}): entry points missing from the cubin: {sorted(missing)}"
    bad = [f"{name}: {k['stack']} B stack, spills {k['spill_stores']}/{k['spill_loads']} B"
           for name, k in res["kernels"].items()
           if k["spill_stores"] or k["spill_loads"] or k["stack"] > STACK_ALLOWLIST.get(name, 0)]
    assert not bad, f"{src.name} ({path}, {arch}) under NVRTC:\n" + "\n".join(bad)


def test_elf_functions_reads_a_symbol_table():
    """A hand-built ELF64 with one section header table: a symtab of one function and one object."""
    strtab = b"\0kern\0data\0"
    sym = struct.pack("<IBBHQQ", 1, 0x12, 0, 0, 0, 0) + struct.pack("<IBBHQQ", 6, 0x11, 0, 0, 0, 0)
    head = 64
    body = strtab + sym
    shoff = head + len(body)
    shdrs = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
             struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, head, len(strtab), 0, 0, 1, 0),
             struct.pack("<IIQQQQIIQQ", 0, 2, 0, 0, head + len(strtab), len(sym), 1, 0, 8, 24)]
    header = bytearray(64)
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HH", header, 0x3A, 64, len(shdrs))
    assert elf_functions(bytes(header) + body + b"".join(shdrs)) == {"kern"}
