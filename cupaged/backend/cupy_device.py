"""CupyDevice: the CUDA backend's `Device` on a real GPU, through CuPy.

NVRTC modules through `cupy.RawModule(code=...)` (a `.cu` file is read as text: `RawModule(path=)`
only loads cubin/PTX), one per file, compiled on first launch; cuBLAS `cublasGemmEx` called through
ctypes on a handle of our own (CuPy's cuBLAS wrappers refuse to run during CUDA graph capture);
pinned staging for host -> device uploads; CUDA graph capture on a side stream with a private
memory pool; asynchronous block copies for swap. Nothing here imports CuPy at import time.
"""
from __future__ import annotations

import ctypes
import functools
import re
from typing import Any

import numpy as np

from cupaged.backend.kernels import DEFAULT_DYN_SMEM, NVRTC_OPTIONS, Device, Graph, Kernel, source_path, source_text

# cudaDataType_t and cuBLAS enums (cublas_api.h, library_types.h)
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # NVIDIA's recommendation for Hopper; plenty for Ampere
CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses


@functools.cache
def _raw_module(file: str, options: tuple[str, ...]):
    """One RawModule per .cu, with its local headers spliced in (`inline_headers`)."""
    import cupy
    return cupy.RawModule(code=inline_headers(file), options=options)


def inline_headers(file: str) -> str:
    """The source of cuda/<file> with each `#include "x.cuh"` of a header beside it replaced by that
    header's text. CuPy's on-disk kernel cache keys on the source string only, so a header reached
    through -I could change without invalidating the cached cubin; spliced in, it is part of the key."""
    def splice(line: str) -> str:
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        if m and (source_path(file).parent / m.group(1)).is_file():
            return f"// ---- {m.group(1)} (inlined)\n{source_text(m.group(1))}\n// ---- end of {m.group(1)}"
        return line

    return "\n".join(splice(line) for line in source_text(file).split("\n"))


def _find_cublas() -> ctypes.CDLL:
    """The libcublas that CuPy loaded (same process, same handle type), else the system's."""
    import ctypes.util

    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load libcublas into the process
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublas.so" in line and "libcublasLt" not in line}
    except OSError:
        paths = set()
    for p in sorted(paths) + [ctypes.util.find_library("cublas") or "", "libcublas.so"]:
        if p:
            try:
                return ctypes.CDLL(p)
            except OSError:
                continue
    raise OSError("cannot find libcublas (install CuPy's CUDA libraries or the CUDA toolkit)")


class _Cublas:
    """One cuBLAS handle with its own workspace, driven through ctypes.

    The handle's stream is set to CuPy's current stream when it changes; setting a stream drops a
    user workspace, so the workspace (allocated once, before any capture) is set again right after.
    Neither call allocates or enqueues work, so a GEMM can be captured into a CUDA graph."""

    def __init__(self):
        import cupy

        self.lib = lib = _find_cublas()
        for fn in ("cublasCreate_v2", "cublasSetStream_v2", "cublasSetWorkspace_v2", "cublasGemmEx"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.cublasGemmEx.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy.empty(CUBLAS_WORKSPACE_BYTES, dtype=cupy.uint8)
        self.stream = None
        self.one = np.ones(1, np.float32)    # host scalars (the default host pointer mode)
        self.zero = np.zeros(1, np.float32)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def set_stream(self, stream_ptr: int) -> None:
        if stream_ptr != self.stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.data.ptr),
                                                       ctypes.c_size_t(self.workspace.nbytes)), "cublasSetWorkspace")
            self.stream = stream_ptr

    def gemm_rowmajor(self, x, w, out, in_type: int, out_type: int, accumulate: bool) -> None:
        """out [M, N] (+)= x [M, K] @ w [N, K].T, all row-major and C-contiguous.

        cuBLAS is column-major: row-major out is column-major out^T [N, M] (ld N), row-major w is
        column-major w^T [K, N] (ld K) and row-major x is x^T [K, M] (ld K). So
        out^T = op_T(w^T) @ x^T: transa = T on w, transb = N on x, m = N, n = M, k = K."""
        import cupy

        m_rows, k = x.shape
        n = w.shape[0]
        self.set_stream(cupy.cuda.get_current_stream().ptr)
        beta = self.one if accumulate else self.zero
        self._check(self.lib.cublasGemmEx(
            self.handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m_rows, k,
            self.one.ctypes.data, w.data.ptr, in_type, k, x.data.ptr, in_type, k,
            beta.ctypes.data, out.data.ptr, out_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx")


def graph_memory_pool(memory: list):
    """The graph pool: a CuPy MemoryPool whose allocator takes device memory that is never freed (it is
    kept in `memory`). CuPy's pool frees its cached blocks when an allocation fails; those blocks are
    intermediates baked into captured graphs, so they must stay allocated for the life of the device.
    The allocator holds the list, not the device: a bound method would tie the device into a cycle."""
    import cupy

    def malloc(nbytes: int):
        mem = cupy.cuda.Memory(nbytes)
        memory.append(mem)
        return cupy.cuda.MemoryPointer(mem, 0)

    return cupy.cuda.MemoryPool(malloc)


class CupyDevice(Device):
    """The current CuPy device: NVRTC modules, raw launches on the current stream, cuBLAS GEMMs."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.xp = cupy
        dev = cupy.cuda.Device()
        self.max_shared_mem = int(dev.attributes.get("MaxSharedMemoryPerBlockOptin", DEFAULT_DYN_SMEM))
        self.compute_capability = dev.compute_capability
        self._functions: dict[tuple[str, str], Any] = {}
        self._opted_in: dict[tuple[str, str], int] = {}
        self._blas: _Cublas | None = None
        self._staging = [_PinnedStaging() for _ in range(STAGING_SLOTS)]
        self._next_staging = 0
        self._capture_stream = None
        self._graph_pool = None
        self._graph_memory: list = []  # every allocation of the graph pool, kept alive

        self._copy_stream = None  # made on the first swap

    def function(self, kernel: Kernel):
        key = (kernel.file, kernel.name)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = _raw_module(kernel.file, NVRTC_OPTIONS).get_function(kernel.name)
        return fn

    def run(self, kernel: Kernel, grid, block, args, shared_mem) -> None:
        fn = self.function(kernel)
        key = (kernel.file, kernel.name)
        if shared_mem > DEFAULT_DYN_SMEM and self._opted_in.get(key, DEFAULT_DYN_SMEM) < shared_mem:
            fn.max_dynamic_shared_size_bytes = shared_mem
            self._opted_in[key] = shared_mem
        fn(grid, block, tuple(args), shared_mem=shared_mem)

    def gemm(self, x, w, bias=None, bf16: bool = False):
        import cupy

        blas = self._blas = self._blas or _Cublas()
        dtype = CUDA_R_16BF if bf16 else CUDA_R_16F
        out = cupy.empty((x.shape[0], w.shape[0]), dtype=x.dtype)
        if x.shape[0] == 0:
            return out
        if bias is not None:
            out[...] = bias  # a broadcast copy of the bits (uint16 for bf16 too); the GEMM adds onto it, beta = 1
        blas.gemm_rowmajor(x, w, out, dtype, dtype, accumulate=bias is not None)
        return out

    # --- host -> device, graphs, memory ---------------------------------------------------------
    def upload(self, host: np.ndarray, out=None):
        """Copy `host` into pinned staging, then one asynchronous copy to the device on the current
        stream. Staging buffers are used in turn, each waiting for its previous copy to finish."""
        import cupy

        host = np.ascontiguousarray(host)
        staging = self._staging[self._next_staging]
        self._next_staging = (self._next_staging + 1) % STAGING_SLOTS
        pinned = staging.fill(host)
        if out is None:
            out = cupy.empty(host.shape, dtype=host.dtype)
        elif out.nbytes != host.nbytes or out.dtype != host.dtype or not out.flags.c_contiguous:
            raise ValueError(f"upload: host {host.dtype}{host.shape} does not fit device {out.dtype}{out.shape}")
        stream = cupy.cuda.get_current_stream()
        out.data.copy_from_host_async(pinned.ctypes.data, host.nbytes, stream)
        staging.event = stream.record()
        return out

    def capture(self, fn):
        """Run fn once on a side stream (compiles kernels, binds cuBLAS to the stream), then capture a
        second run into a CUDA graph. Allocations go to a private memory pool that only graphs use, so
        no later allocation can land in a graph's intermediates."""
        import cupy

        if self._capture_stream is None:
            # Non-blocking: a capturing blocking stream would make the legacy default stream unusable.
            # Ordering is explicit instead: both streams are synchronized around the warm-up.
            self._capture_stream = cupy.cuda.Stream(non_blocking=True)
            self._graph_pool = graph_memory_pool(self._graph_memory)
        stream = self._capture_stream
        cupy.cuda.get_current_stream().synchronize()
        with stream, cupy.cuda.using_allocator(self._graph_pool.malloc):
            fn()
            stream.synchronize()
            stream.begin_capture()
            try:
                output = fn()
            except BaseException:
                try:
                    stream.end_capture()  # end the broken capture; the error that broke it is the one raised
                except Exception:
                    pass
                raise
            graph = stream.end_capture()
        return CupyGraph(graph, output)

    @property
    def graph_pool_bytes(self) -> int:
        return sum(mem.size for mem in self._graph_memory)

    def memory_info(self) -> tuple[int, int]:
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        free, total = cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def release_cached(self) -> None:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()

    def pinned_empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)

    def copy_async(self, copies: list[tuple[Any, Any]]) -> None:
        """One cudaMemcpyAsync per (dst, src) on a dedicated non-blocking stream, fenced by two events:
        the copy stream waits for the current stream's queued work (the kernels that wrote the blocks),
        and the current stream waits for the copies (before anything reuses or reads the blocks)."""
        import cupy

        runtime = cupy.cuda.runtime
        compute = cupy.cuda.get_current_stream()
        if self._copy_stream is None:
            self._copy_stream = cupy.cuda.Stream(non_blocking=True)
        stream = self._copy_stream
        stream.wait_event(compute.record())
        for dst, src in copies:
            if dst.nbytes != src.nbytes or not (dst.flags.c_contiguous and src.flags.c_contiguous):
                raise ValueError(f"copy_async: {dst.shape} <- {src.shape} must be C-contiguous and of equal size")
            runtime.memcpyAsync(_address(dst), _address(src), src.nbytes, CUDA_MEMCPY_DEFAULT, stream.ptr)
        compute.wait_event(stream.record())


STAGING_SLOTS = 4  # pinned staging buffers used in turn (a step uploads its metadata and its sampling parameters)


class _PinnedStaging:
    """A growable pinned host buffer and the event of the last copy out of it."""

    def __init__(self):
        self.buffer: np.ndarray | None = None  # uint8, pinned
        self.event = None

    def fill(self, host: np.ndarray) -> np.ndarray:
        import cupyx

        if self.event is not None:
            self.event.synchronize()  # the previous copy from this buffer has finished
        if self.buffer is None or self.buffer.nbytes < host.nbytes:
            self.buffer = cupyx.empty_pinned(max(host.nbytes, 2 * (self.buffer.nbytes if self.buffer is not None
                                                                    else 4096)), dtype=np.uint8)
        view = self.buffer[:host.nbytes].view(host.dtype).reshape(host.shape)
        view[...] = host
        return view


class CupyGraph(Graph):
    def __init__(self, graph, output):
        self.graph, self.output = graph, output

    def replay(self):
        import cupy

        self.graph.launch(cupy.cuda.get_current_stream())
        return self.output


def _address(a) -> int:
    """The first byte of a CuPy array (device) or a NumPy array (host)."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr
