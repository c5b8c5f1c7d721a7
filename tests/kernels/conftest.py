"""The kernel tests run on two backends: the host emulator ("emu", everywhere) and a real device through
CuPy RawModule ("gpu", marked `gpu`, skipped without CuPy or a device). Select with `pytest -m gpu`."""
from __future__ import annotations

import pytest


class KernelLoader:
    """`load("cuda/x.cu")` -> a module with `.kernels` and `.launch(...)` on this backend."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, path, asan: bool = False, defines: dict | None = None):
        if self.backend == "emu":
            from tests.emu.harness import load_module
            return load_module(path, asan=asan, defines=defines)
        if asan:
            pytest.skip("ASan builds exist only in the host emulator")
        from tests.emu.gpu import load_gpu_module
        return load_gpu_module(path, defines=defines)

    def emu_only(self, why: str) -> None:
        """Skip the current test on the GPU backend (e.g. an emulator thread schedule)."""
        if self.backend != "emu":
            pytest.skip(why)


@pytest.fixture(scope="session", params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def kernel_module(request) -> KernelLoader:
    if request.param == "gpu":
        from tests.emu.gpu import gpu_skip_reason
        if (why := gpu_skip_reason()) is not None:
            pytest.skip(f"gpu backend: {why}")
    return KernelLoader(request.param)
