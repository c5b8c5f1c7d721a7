"""Small helpers shared across the package: ceiling division and bfloat16 <-> float32 conversions.

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
