"""The CUDA backend's Device on the CPU: NumPy arrays stand in for device arrays, the kernels of
cuda/*.cu run through the host emulator (tests/emu/harness.py), and NumPy stands in for cuBLAS.

    from cupaged.backend.cuda import CudaOps
    from tests.emu.device import EmuDevice
    ops = CudaOps(EmuDevice(), dtype="bfloat16", partition_size=64)

Everything above the device (the CudaOps wrappers, launch geometry, argument packing, shared
memory sizes, the model and the runner) is the code a GPU runs. `launches` records each kernel
name in order, so a test can tell which path an op took; `copies` records the number of bytes of
each `copy_async` transfer (one per run of blocks when KV blocks are swapped).
"""
from __future__ import annotations

import numpy as np

from cupaged.backend.kernels import Device, Kernel, source_path
from tests.emu.harness import MAX_DYN_SMEM, from_bf16, load_module, to_bf16


class EmuDevice(Device):
    name = "emu"
    xp = np
    max_shared_mem = MAX_DYN_SMEM  # sm_90's opt-in limit (227 KiB)

    def __init__(self, schedule: str = "interleaved", workers: int | None = None):
        self.schedule, self.workers = schedule, workers
        self.launches: list[str] = []
        self.copies: list[int] = []

    def run(self, kernel: Kernel, grid, block, args, shared_mem) -> None:
        self.launches.append(kernel.name)
        load_module(source_path(kernel.file)).launch(kernel.name, grid=grid, block=block, args=args,
                                                     shared_mem=shared_mem, schedule=self.schedule,
                                                     workers=self.workers)

    def gemm(self, x, w, bias=None, bf16: bool = False):
        """float32 GEMM of the stored values, rounded once to the storage dtype (as cuBLAS with an
        fp32 compute type does)."""
        def f32(a):
            return from_bf16(a) if bf16 else a.astype(np.float32)

        out = f32(x) @ f32(w).T
        if bias is not None:
            out += f32(bias)
        return np.ascontiguousarray(to_bf16(out) if bf16 else out.astype(np.float16))

    def pinned_empty(self, shape, dtype) -> np.ndarray:
        """Plain host memory: there is no device to pin it for."""
        return np.empty(shape, dtype=dtype)

    def copy_async(self, copies) -> None:
        """The copies, done now (the emulator has one stream, so the ordering CupyDevice fences is given)."""
        for dst, src in copies:
            if dst.nbytes != src.nbytes or not (dst.flags.c_contiguous and src.flags.c_contiguous):
                raise ValueError(f"copy_async: {dst.shape} <- {src.shape} must be C-contiguous and of equal size")
            np.copyto(dst, src)
            self.copies.append(src.nbytes)
