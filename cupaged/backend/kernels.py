"""Kernel loading and launching for the CUDA backend, behind a small `Device` seam.

A `Device` supplies the array module (`xp`), one compiled module per `cuda/*.cu` file, a raw
launch, a GEMM, and pinned host memory with asynchronous copies (for swapping KV blocks).
`CupyDevice` is the real one: CuPy arrays, NVRTC through
`cupy.RawModule(code=...)` (a `.cu` file is read as text: `RawModule(path=)` only loads
cubin/PTX), and cuBLAS `cublasGemmEx` called through ctypes on a handle of our own (CuPy's
cuBLAS wrappers refuse to run during CUDA graph capture). The test suite adds an emulation
device (`tests/emu/device.py`) with NumPy arrays and the host emulator, so this file holds
no test code.

Nothing compiles at import, and nothing here imports CuPy at import time: a module is
compiled the first time one of its kernels is launched, once per file (`functools.cache`,
plus CuPy's own on-disk cache).

`CupyDevice` lives in `cupaged/backend/cupy_device.py`.

    >>> k = device.kernel("layernorm.cu", "rms_norm_f16")
    >>> launch(k, grid=(T,), block=(256,), args=[out, x, w, np.float32(eps), np.int32(H)], shared_mem=0)
"""
from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAX_THREADS = 1024
DEFAULT_DYN_SMEM = 48 * 1024   # above this a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize)
SCALARS = (np.int32, np.float32, np.uint32)  # the only scalar types a launch accepts
NVRTC_OPTIONS = ("--std=c++17",)  # CuPy adds -arch for the current device itself


# ---- sources -------------------------------------------------------------------------------------
def source_path(file: str) -> Path:
    """The path of cuda/<file>: the installed package data `cupaged.cuda`, else the repository's cuda/."""
    try:
        p = importlib.resources.files("cupaged.cuda") / file
        if p.is_file():
            return Path(str(p))
    except (ModuleNotFoundError, TypeError):  # an editable checkout maps no cupaged.cuda package
        pass
    p = Path(__file__).resolve().parents[2] / "cuda" / file
    if not p.is_file():
        raise FileNotFoundError(f"kernel source {file} is neither package data (cupaged.cuda) nor in {p.parent}")
    return p


@functools.cache
def source_text(file: str) -> str:
    return source_path(file).read_text()


# ---- the device seam -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """One entry point of one source file on one device (cheap: nothing compiles until launch)."""

    device: "Device"
    file: str
    name: str


class Device:
    """What the CUDA backend needs from a device. Subclasses set `name`, `xp`, `max_shared_mem`."""

    name = "abstract"
    xp: Any = None
    max_shared_mem = DEFAULT_DYN_SMEM

    def kernel(self, file: str, name: str) -> Kernel:
        return Kernel(self, file, name)

    def is_array(self, a) -> bool:
        return isinstance(a, self.xp.ndarray)

    def run(self, kernel: Kernel, grid: tuple, block: tuple, args: list, shared_mem: int) -> None:
        """Launch, after `launch` checked the arguments."""
        raise NotImplementedError

    def gemm(self, x, w, bias=None, bf16: bool = False):
        """x [M, K] @ w [N, K].T (+ bias [N]) -> new [M, N] in x's dtype, fp32 accumulation. x, w and bias
        share one storage dtype: float16, or bfloat16 as uint16 bit patterns when `bf16` is set."""
        raise NotImplementedError

    def pinned_empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised numpy.ndarray in page-locked host memory (copies to and from it can be asynchronous)."""
        raise NotImplementedError

    def copy_async(self, copies: list[tuple[Any, Any]]) -> None:
        """Copy each (dst, src): C-contiguous arrays of equal size, each a device array or pinned host memory.
        The copies run on a copy stream, after the work queued so far on the current stream, and the
        current stream waits for them before its next work; the host does not wait."""
        raise NotImplementedError

    def upload(self, host: np.ndarray, out=None):
        """One host -> device copy of `host` (into `out`, a device array of the same size and dtype,
        when given); returns the device array. The base class copies synchronously."""
        if out is None:
            return self.xp.array(host)
        out.reshape(-1)[...] = self.xp.asarray(host).reshape(-1)
        return out

    def capture(self, fn: Callable[[], Any]) -> "Graph | None":
        """Capture fn's launches as a graph replayable on the same buffers; None: this device has none."""
        return None

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) bytes of device memory, with this process's cached allocations counted as used;
        None where there is no device memory to size (the KV pool then comes from host RAM)."""
        return None

    def release_cached(self) -> None:
        """Give cached but unused allocations back to the device."""


class Graph:
    """A captured sequence of launches: `replay()` runs it again on the same buffers and returns the
    array fn returned at capture (which the replay overwrites in place)."""

    output: Any = None

    def replay(self) -> Any:
        raise NotImplementedError


_ONES = ((), (1, 1), (1,), ())  # what pads a tuple of 0-3 sizes to three
_PLAIN = frozenset((type(None), *SCALARS))  # argument types a launch takes as they are


def _dim3(v, what: str) -> tuple[int, int, int]:
    if type(v) is tuple and 1 <= len(v) <= 3:  # the usual launch: a tuple of positive Python ints
        v3 = v + _ONES[len(v)]
        x, y, z = v3
        if type(x) is int and type(y) is int and type(z) is int and x >= 1 and y >= 1 and z >= 1:
            return v3
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in t):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {v!r}")
    return tuple(int(x) for x in t) + (1,) * (3 - len(t))


def launch(kernel: Kernel, *, grid, block, args, shared_mem: int = 0) -> None:
    """Launch `kernel` over grid x block with `shared_mem` bytes of dynamic shared memory.

    Checks what the hardware would silently get wrong: at most 1024 threads per block, dynamic
    shared memory within the device's opt-in limit, arguments that are device arrays, None
    (a null pointer) or np.int32 / np.float32 / np.uint32 scalars. A Python int or float is
    refused (CuPy would pass a float as a double, which the kernel would misread)."""
    dev = kernel.device
    g, b = _dim3(grid, "grid"), _dim3(block, "block")
    if b[0] * b[1] * b[2] > MAX_THREADS:
        raise ValueError(f"{kernel.name}: block {b} has more than {MAX_THREADS} threads")
    if not 0 <= shared_mem <= dev.max_shared_mem:
        raise ValueError(f"{kernel.name}: {shared_mem} B of dynamic shared memory; the device allows "
                         f"{dev.max_shared_mem} B")
    kinds = {type(a) for a in args} - _PLAIN
    kinds.discard(dev.xp.ndarray)
    for i, a in enumerate(args if kinds else ()):  # a type other than exact device arrays and the scalars
        if not (a is None or type(a) in SCALARS or dev.is_array(a)):
            raise TypeError(f"{kernel.name}: argument {i} is {type(a).__name__} {a!r}; pass device arrays or "
                            f"np.int32 / np.float32 scalars")
    dev.run(kernel, g, b, list(args), int(shared_mem))
