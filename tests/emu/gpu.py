"""The harness's module interface on a real GPU: the same cuda/*.cu source through CuPy RawModule (NVRTC).

    from tests.emu.gpu import load_gpu_module, gpu_skip_reason
    mod = load_gpu_module("cuda/layernorm.cu")               # compiled once per (path, defines)
    mod.kernels                                              # {"rms_norm_f16": "ptr:f16,ptr:f16,ptr:f16,f32,i32", ...}
    mod.launch("rms_norm_f16", grid=(T,), block=(256,), args=[out, x, w, np.float32(eps), np.int32(H)])

`launch` checks the arguments exactly as the emulator does (numpy arrays for pointers, exact numpy scalar
types), copies every array to the device, launches, synchronizes and copies every array back into the
caller's numpy array in place, so a test reads its outputs the same way on both backends. Emulator-only
keywords (`schedule=`, `workers=`) are accepted and ignored. CuPy is imported only when a module is loaded.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from tests.emu.harness import ROOT, EmuArgError, EmuError, _dim3, _pack, _strip_comments, find_kernels

# CI's nvcc runs `-O3 -std=c++17`. NVRTC has no -O flag (its ptxas step already runs at -O3), and CuPy
# adds the device's -arch itself; it adds its own --std only when the options carry none.
NVRTC_OPTIONS = ("--std=c++17",)
DEFAULT_DYN_SMEM = 48 * 1024  # above this a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize)

_SCALAR_TYPES = {
    "float": "f32", "double": "f64", "__half": "f16", "half": "f16", "__nv_bfloat16": "bf16",
    "nv_bfloat16": "bf16", "bool": "bool", "__half2": "f16x2", "half2": "f16x2", "__nv_bfloat162": "bf16x2",
    "nv_bfloat162": "bf16x2", "float2": "f32x2", "float4": "f32x4", "void": "any",
    "char": "i8", "signed char": "i8", "unsigned char": "u8", "short": "i16", "unsigned short": "u16",
    "int": "i32", "signed": "i32", "signed int": "i32", "unsigned": "u32", "unsigned int": "u32",
    "long": "i64", "unsigned long": "u64", "long long": "i64", "unsigned long long": "u64", "size_t": "u64",
    "int8_t": "i8", "uint8_t": "u8", "int16_t": "i16", "uint16_t": "u16", "int32_t": "i32", "uint32_t": "u32",
    "int64_t": "i64", "uint64_t": "u64",
}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict", "struct"}


# ---- signatures from the source (the emulator reads them from its compiled build) -------------------
def _macros(text: str) -> dict[str, tuple[list[str] | None, str]]:
    """The file's own #defines: name -> (parameters or None for an object-like macro, body)."""
    out = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(\(([^)]*)\))?(.*)$", text, flags=re.M):
        params = [p.strip() for p in m.group(3).split(",")] if m.group(2) is not None else None
        out[m.group(1)] = (params, m.group(4).strip())
    return out


def _balanced(text: str, open_at: int) -> int:
    """Index just past the parenthesis that closes the one at text[open_at]."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise EmuError(f"unbalanced parentheses after {text[open_at:open_at + 60]!r}")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside (), <> and []."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"(": 1, "<": 1, "[": 1, ")": -1, ">": -1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand(text: str, macros: dict) -> str:
    """Expand the file's macros in a parameter list (no # or ## operators needed there)."""
    for _ in range(16):
        before = text
        text = _expand_once(text, macros)
        if text == before:
            break
    return text


def _expand_once(text: str, macros: dict) -> str:
    for name, (params, body) in macros.items():
        for m in reversed(list(re.finditer(rf"\b{name}\b", text))):
            if params is None:
                text = text[:m.start()] + body + text[m.end():]
                continue
            paren = re.match(r"\s*\(", text[m.end():])
            if not paren:
                continue
            open_at = m.end() + paren.end() - 1
            close = _balanced(text, open_at)
            args = _split_top(text[open_at + 1:close - 1])
            sub = body
            for p, a in zip(params, args):
                sub = re.sub(rf"\b{re.escape(p)}\b", lambda _m, a=a: a, sub)
            text = text[:m.start()] + sub + text[close:]
    return text


def _type_code(param: str) -> str:
    """'const __half* __restrict__ x' -> 'ptr:f16', as the emulator's type_code<T>() names it."""
    stars = param.count("*")
    words = [w for w in re.sub(r"[*&]", " ", param).split() if w not in _QUALIFIERS]
    if len(words) > 1 and " ".join(words) not in _SCALAR_TYPES:
        words = words[:-1]  # the parameter's name
    base = _SCALAR_TYPES.get(" ".join(words), "?")
    if stars == 0:
        return base
    if base in ("f16x2", "bf16x2", "f32x2", "f32x4"):
        base = base[:-2]
    elif base == "?":
        base = "any"
    return "ptr:" * stars + base


def kernel_signatures(src: str) -> dict[str, str]:
    """{kernel: "ptr:f16,f32,i32"} for every extern "C" __global__ of a source text ('?' = unknown type)."""
    text = _strip_comments(re.sub(r"\\\n", " ", src))
    macros = _macros(text)
    body = re.sub(r"^[ \t]*#.*$", "", text, flags=re.M)
    body = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", body)
    out = {}
    for name in find_kernels(src):
        m = re.search(rf"\b__global__\b[^;{{}}()]*?\b{name}\s*\(", body)
        if m is None:
            raise EmuError(f"cannot find the parameter list of kernel {name}")
        params = _split_top(_expand(body[m.end():_balanced(body, m.end() - 1) - 1], macros))
        out[name] = "" if params in ([], ["void"]) else ",".join(_type_code(p) for p in params)
    return out


# ---- device availability ----------------------------------------------------------------------------
@functools.cache
def gpu_skip_reason() -> str | None:
    """None when CuPy imports and sees a CUDA device, else why the GPU tests are skipped."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a CuPy build that fails to load its CUDA libraries
        return f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver: cudaErrorNoDevice / InsufficientDriver
        return f"no CUDA device ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA device (cupy.cuda.runtime.getDeviceCount() == 0)"


# ---- the module -------------------------------------------------------------------------------------
class GpuModule:
    """One .cu file compiled by NVRTC for the current device; the emulator Module's interface."""

    backend = "gpu"

    def __init__(self, src: Path, defines: dict | None):
        import cupy

        self.src, self.defines = src, defines
        code = src.read_text()
        self.kernels = kernel_signatures(code)
        self.options = nvrtc_options(src, defines)
        self._raw = cupy.RawModule(code=code, options=self.options)
        self._functions: dict = {}

    def function(self, name: str):
        """The cupy.RawKernel of `name` (compiles the module on first use)."""
        if name not in self.kernels:
            raise EmuError(f"{self.src.name} has no extern \"C\" __global__ kernel {name!r}; has {sorted(self.kernels)}")
        if name not in self._functions:
            self._functions[name] = self._raw.get_function(name)
        return self._functions[name]

    def launch(self, name: str, grid, block, args, shared_mem: int = 0, **ignored) -> None:
        """Run kernel `name` on the device and copy every array argument back in place.

        Emulator-only keywords (schedule=, workers=) are ignored: the hardware picks its own order."""
        import cupy

        fn = self.function(name)
        codes = self.kernels[name].split(",") if self.kernels[name] else []
        if len(args) != len(codes):
            raise EmuArgError(f"{name} takes {len(codes)} arguments ({self.kernels[name]}), got {len(args)}")
        for i, (code, a) in enumerate(zip(codes, args)):
            if code.startswith("b") and code[1:].isdigit() or "?" in code:
                raise EmuArgError(f"{name}: argument {i} has a type the GPU backend cannot pass ({code})")
            _pack(name, i, code, a)  # the emulator's exact type checks; raises EmuArgError
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        if shared_mem > DEFAULT_DYN_SMEM:
            fn.max_dynamic_shared_size_bytes = shared_mem
        dev = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        fn((g.x, g.y, g.z), (b.x, b.y, b.z), tuple(dev), shared_mem=shared_mem)
        cupy.cuda.runtime.deviceSynchronize()
        for a, d in zip(args, dev):
            if isinstance(a, np.ndarray):
                np.copyto(a, cupy.asnumpy(d))


def nvrtc_options(src: Path, defines: dict | None) -> tuple[str, ...]:
    """NVRTC options for a source: CI's language standard, its folder for local includes, the defines."""
    opts = [*NVRTC_OPTIONS, f"-I{src.parent}"]
    opts += [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    return tuple(opts)


@functools.cache
def _load(src: str, defines: tuple) -> GpuModule:
    return GpuModule(Path(src), dict(defines) or None)


def load_gpu_module(path, defines: dict | None = None) -> GpuModule:
    """Compile (once per path and defines) a .cu file with NVRTC; path is absolute or relative to the repo root."""
    src = Path(path)
    src = (src if src.is_absolute() else ROOT / src).resolve()
    return _load(str(src), tuple(sorted((defines or {}).items())))
