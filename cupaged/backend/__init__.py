"""Backends: `get_ops("cpu" | "cuda" | "auto")`. Importing this package imports no backend."""
from __future__ import annotations

import logging

from cupaged.backend.ops import AttnMetadata, Ops
from cupaged.errors import CupagedError

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device
        return False


def get_ops(backend: str = "auto", dtype: str = "auto") -> Ops:
    """dtype: "auto" (CPU float32, CUDA float16); "float16" / "bfloat16" on CUDA; on the CPU "float32"
    "bfloat16" or "q8_0" (weight matrices stored bf16 or 8-bit, computed in float32; on AVX-512 VNNI
    CPUs a q8_0 decode's activations go int8, see cpu_vnni)."""
    if backend == "auto":
        backend = "cuda" if cuda_available() else "cpu"
    if backend == "cpu":
        from cupaged.backend.cpu import CpuOps
        if dtype not in ("auto", "float32", "bfloat16", "q8_0"):
            raise CupagedError(f"the CPU backend takes dtype 'float32', 'bfloat16' or 'q8_0' (weights); "
                               f"{dtype!r} needs backend='cuda'")
        return CpuOps(weights="float32" if dtype == "auto" else dtype)
    if backend == "cuda":
        if not cuda_available():
            raise CupagedError("backend 'cuda' needs CuPy and a CUDA device: pip install 'cupaged[cuda]'")
        from cupaged.backend.cuda import CudaOps
        return CudaOps(dtype="float16" if dtype == "auto" else dtype)
    raise CupagedError(f"unknown backend {backend!r}: choose auto, cpu or cuda")


__all__ = ["AttnMetadata", "Ops", "get_ops", "cuda_available"]
