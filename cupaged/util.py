"""Small helpers shared across the package: ceiling division, bfloat16 <-> float32 conversions and
cache-line-aligned host arrays.

bfloat16 arrays are held as their uint16 bit patterns (NumPy has no bfloat16; CuPy's needs ml_dtypes),
so one pair of conversions serves the loader, the CUDA backend and the emulator's references. `xp` is
numpy or cupy.
"""
from __future__ import annotations

from typing import Any


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def float_to_bf16_bits(xp, x) -> Any:
    """float32 values -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    b = x.view(xp.uint32)
    rounded = (b + (xp.uint32(0x7FFF) + ((b >> 16) & xp.uint32(1)))) >> 16
    return xp.where(xp.isnan(x), (b >> 16) | xp.uint32(0x40), rounded).astype(xp.uint16)


def bf16_bits_to_float(xp, bits) -> Any:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (xp.asarray(bits, dtype=xp.uint16).astype(xp.uint32) << 16).view(xp.float32)


ALIGN = 64  # bytes: a cache line, and one AVX-512 vector
ALIGN_FROM = 64 << 10  # bytes: smaller arrays are left where NumPy puts them (see aligned_empty)


def aligned_empty(shape, dtype) -> Any:
    """numpy.empty whose data starts on an ALIGN-byte boundary when it holds ALIGN_FROM bytes or more.
    NumPy's own allocations start on 16 bytes; an AVX-512 load from such an array crosses a cache line
    every time and costs two: the CPU GEMM at 512 rows ran 155-178 GF/s aligned against 123-152 at 16
    bytes off (`benchmarks/cpu_gemm.py --offset`, Intel Xeon). Aligning costs ~7 us (numpy's ctypes view), more than a decode step's small arrays gain,
    so those get a plain numpy.empty."""
    import numpy as np

    out = np.empty(shape, dtype)  # the common, small case at its cheapest (~0.3 us)
    if out.nbytes < ALIGN_FROM:
        return out
    raw = np.empty(out.nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + out.nbytes].view(out.dtype).reshape(out.shape)


def aligned(x) -> Any:
    """x itself when it is C-contiguous and either small (under ALIGN_FROM bytes) or starts on an
    ALIGN-byte boundary, else an aligned C-contiguous copy."""
    if x.flags.c_contiguous and (x.nbytes < ALIGN_FROM or x.ctypes.data % ALIGN == 0):
        return x
    out = aligned_empty(x.shape, x.dtype)
    out[...] = x
    return out
