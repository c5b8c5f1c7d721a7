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

from cupaged.backend.kernels import Device, Graph, Kernel, source_path
from tests.emu.harness import MAX_DYN_SMEM, from_bf16, load_module, to_bf16


class EmuDevice(Device):
    name = "emu"
    xp = np
    max_shared_mem = MAX_DYN_SMEM  # sm_90's opt-in limit (227 KiB)

    def __init__(self, schedule: str = "interleaved", workers: int | None = None, graphs: bool = False):
        """graphs: capture and replay graphs (`EmuGraph`); off by default, since every capture runs a
        whole forward in emulation."""
        self.schedule, self.workers, self.graphs = schedule, workers, graphs
        self.launches: list[str] = []
        self.copies: list[int] = []
        self.recording: list | None = None  # launch signatures while an EmuGraph records
        self.persistent: list[np.ndarray] = []  # buffers a graph may keep addresses of (see EmuGraph)

    def run(self, kernel: Kernel, grid, block, args, shared_mem) -> None:
        self.launches.append(kernel.name)
        if self.recording is not None:
            self.recording.append((kernel.name, grid, block, shared_mem, tuple(self._arg_key(a) for a in args)))
        load_module(source_path(kernel.file)).launch(kernel.name, grid=grid, block=block, args=args,
                                                     shared_mem=shared_mem, schedule=self.schedule,
                                                     workers=self.workers)

    def gemm(self, x, w, bias=None, bf16: bool = False):
        """float32 GEMM of the stored values, rounded once to the storage dtype (as cuBLAS with an
        fp32 compute type does)."""
        if self.recording is not None:
            self.recording.append(("gemm", tuple(self._arg_key(a) for a in (x, w, bias))))

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

    # --- graphs -------------------------------------------------------------------------------
    def capture(self, fn):
        return EmuGraph(self, fn) if self.graphs else None

    def upload(self, host, out=None):
        whole = out if out is None or out.base is None else out.base  # a slice registers its buffer
        if whole is not None and not any(whole is buf for buf in self.persistent):
            self.persistent.append(whole)  # a buffer uploaded into is a graph's static input
        return super().upload(host, out)

    @staticmethod
    def _arg_key(a):
        """A launch argument as recorded: a scalar's value, an array's address, shape and dtype."""
        if not isinstance(a, np.ndarray):
            return ("scalar", type(a).__name__, a.item() if hasattr(a, "item") else a)
        return ("array", a.__array_interface__["data"][0], a.shape, a.dtype.str)

    def baked(self, key):
        """What a CUDA graph bakes in for a recorded argument: a scalar's value; for a pointer into a
        persistent buffer, which buffer and the offset; for any other array only its shape (its address
        is graph-private scratch, the same on every replay by construction)."""
        if key[0] != "array":
            return key
        _, ptr, shape, dtype = key
        for i, buf in enumerate(self.persistent):
            lo = buf.__array_interface__["data"][0]
            if lo <= ptr < lo + max(buf.nbytes, 1):
                return ("persistent", i, ptr - lo, shape, dtype)
        return ("scratch", shape, dtype)


class EmuGraph(Graph):
    """A CUDA graph in emulation. Capture runs fn and records every launch's signature (kernel, grid,
    block, shared memory, scalar values, and which persistent buffer each pointer falls in); replay runs
    fn again and asserts it launches exactly the same. So a step that would not replay correctly on a
    GPU (a grid or scalar taken from this step's data, a buffer allocated anew instead of the static
    one) fails here. Persistent buffers: the device's `persistent` list (every `upload(out=)` target is
    added; a test may add the KV caches and weights)."""

    def __init__(self, device: EmuDevice, fn):
        self.device, self.fn = device, fn
        self.signature = self._record()
        self.replays = 0

    def _record(self) -> list:
        self.device.recording = []
        try:
            self.output = self.fn()
            return self.device.recording
        finally:
            self.device.recording = None

    def replay(self):
        signature = [self._baked(launch) for launch in self._record()]
        captured = [self._baked(launch) for launch in self.signature]
        if signature != captured:
            diff = next((f"launch {i}: captured {a}, replayed {b}" for i, (a, b) in
                         enumerate(zip(captured, signature)) if a != b),
                        f"{len(captured)} launches captured, {len(signature)} replayed")
            raise AssertionError(f"graph replay launched differently from its capture: {diff}")
        self.replays += 1
        return self.output

    def _baked(self, launch: tuple) -> tuple:
        *head, args = launch
        return (*head, tuple(self.device.baked(k) for k in args))
