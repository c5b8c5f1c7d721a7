"""NVRTC on a device (`pytest -m gpu`): every cuda/*.cu compiles through cupy.RawModule, the way the
CuPy backend loads it, and every extern "C" kernel resolves, with no local memory beyond
test_nvcc.STACK_ALLOWLIST (CI checks the same with nvcc, without a GPU).

The unmarked tests run everywhere: the GPU module's source-parsed signatures must equal the ones the
emulator reads from its own build, and its options must carry CI's language standard.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.cuda.test_nvcc import FLAGS, SOURCES, STACK_ALLOWLIST
from tests.emu import gpu

IDS = [s.name for s in SOURCES]


@pytest.fixture(scope="module")
def device():
    if (why := gpu.gpu_skip_reason()) is not None:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_compiles_and_every_kernel_resolves(device, src: Path):
    mod = gpu.load_gpu_module(src)
    assert mod.kernels, f"{src.name}: no extern \"C\" __global__ kernels found"
    for name in mod.kernels:
        assert mod.function(name).max_threads_per_block > 0, name


@pytest.mark.gpu
@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_no_local_memory(device, src: Path):
    mod = gpu.load_gpu_module(src)
    bad = {n: mod.function(n).local_size_bytes for n in mod.kernels}
    bad = {n: b for n, b in bad.items() if b > STACK_ALLOWLIST.get(n, 0)}
    assert not bad, f"{src.name}: kernels with local memory (stack or spills) under NVRTC: {bad}"


@pytest.mark.parametrize("src", [*SOURCES, Path(gpu.__file__).with_name("selftest_kernels.cu")],
                         ids=[*IDS, "selftest_kernels.cu"])
def test_parsed_signatures_match_the_emulator(src: Path):
    harness = pytest.importorskip("tests.emu.harness")
    assert gpu.kernel_signatures(src.read_text()) == harness.load_module(src).kernels


def test_options_follow_ci():
    std = next(f for f in FLAGS if f.startswith("-std="))
    assert "-" + std in gpu.NVRTC_OPTIONS  # nvcc's -std=c++17 spelled as CuPy's --std=c++17
    assert gpu.nvrtc_options(Path("/x/cuda/a.cu"), {"B": 2, "A": None}) == (*gpu.NVRTC_OPTIONS, "-I/x/cuda",
                                                                            "-DA", "-DB=2")
