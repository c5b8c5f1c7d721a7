"""Host emulation of cuda/*.cu kernels: g++ compiles the exact source with cuda_emu.h force-included.

    from tests.emu.harness import load_module
    mod = load_module("cuda/rms_norm.cu")                    # compiled once, cached by content
    mod.kernels                                              # {"rms_norm_f16": "ptr:f16,ptr:f16,ptr:f16,f32,i32"}
    mod.launch("rms_norm_f16", grid=(T,), block=(256,), args=[out, x, w, np.float32(eps), np.int32(H)])

Arrays are passed as device pointers (C-contiguous, dtype checked against the pointee), numpy scalars by
value with exact type checks. See README.md for ASan builds and the rules for kernel authors.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cupaged.util import bf16_bits_to_float, float_to_bf16_bits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHIM = HERE / "cuda_emu.h"
CUDA_INCLUDE = os.environ.get("CUDA_INCLUDE", "/usr/local/cuda/include")
MAX_DYN_SMEM = 227 * 1024
SCHEDULES = {"interleaved": 0, "warp_serial": 1, "reverse": 2}

_SCALARS = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": np.uint16, "bool": np.bool_,
            "i8": np.int8, "u8": np.uint8, "i16": np.int16, "u16": np.uint16, "i32": np.int32,
            "u32": np.uint32, "i64": np.int64, "u64": np.uint64, "f16x2": np.uint32, "bf16x2": np.uint32}
_POINTEES = {"f32": (np.float32,), "f64": (np.float64,), "f16": (np.float16,), "bf16": (np.uint16,),
             "bool": (np.bool_,), "i8": (np.int8, np.uint8), "u8": (np.uint8, np.int8), "i16": (np.int16,),
             "u16": (np.uint16,), "i32": (np.int32,), "u32": (np.uint32,), "i64": (np.int64,),
             "u64": (np.uint64,)}


class EmuError(RuntimeError):
    """A kernel broke a CUDA rule (divergent barrier, bad shuffle mask...) or was launched wrongly."""


class EmuArgError(TypeError):
    """An argument does not match the kernel's parameter type."""


class EmuAsanError(EmuError):
    """AddressSanitizer reported an error; the message holds its report."""


class _Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    return float_to_bf16_bits(np, x)


def from_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return bf16_bits_to_float(np, x)


def poisoned(shape, dtype) -> np.ndarray:
    """An output array filled with 0xFF bytes (NaN for floats), so unwritten elements show."""
    a = np.empty(shape, dtype=dtype)
    a.view(np.uint8).fill(0xFF)
    return a


# ---- source scanning and code generation ------------------------------------------------------------
def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), src, flags=re.S)


def find_kernels(src: str) -> list[str]:
    """Names of the `extern "C" __global__` functions of a source text."""
    text = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", _strip_comments(src))
    names = []
    for m in re.finditer(r"\b__global__\b([^;{}()]*?)(\w+)\s*\(", text):
        head = text[max(text.rfind(";", 0, m.start()), text.rfind("}", 0, m.start())) + 1:m.start()]
        if re.search(r'extern\s+"C"', head) and m.group(2) not in names:
            names.append(m.group(2))
    return names


def find_dynamic_shared(src: str) -> list[str]:
    names = re.findall(r"\bextern\s+__shared__\b[^;\[]*?(\w+)\s*\[\s*\]", _strip_comments(src))
    return sorted(set(names))


def _local_includes(path: Path, seen: set[Path]) -> None:
    for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), flags=re.M):
        dep = (path.parent / inc).resolve()
        if dep.exists() and dep not in seen:
            seen.add(dep)
            _local_includes(dep, seen)


def _main_unit(src_path: Path, kernels: list[str]) -> str:
    out = [f'#include "{src_path}"', ""]
    for k in kernels:
        out.append(f"EMU_EXPORT int emu_launch_{k}(dim3 g, dim3 b, size_t sh, void** a) "
                   f"{{ return emu::launch(&{k}, g, b, sh, a); }}")
        out.append(f"EMU_EXPORT const char* emu_sig_{k}() {{ return emu::signature(&{k}); }}")
    return "\n".join(out) + "\n"


def _smem_unit(names: list[str]) -> str:
    out = ['extern "C" {']
    out += [f"alignas(256) thread_local unsigned char {n}[{MAX_DYN_SMEM}];" for n in names]
    out.append("__attribute__((visibility(\"default\"))) int emu_dyn_buffers(unsigned char** o, int max) {")
    out.append("  int n = 0;")
    out += [f"  if (n < max) o[n++] = {n};" for n in names]
    out += ["  return n;", "}", "}"]
    return "\n".join(out) + "\n"


def _cache_dir() -> Path:
    d = Path(os.environ.get("CUPAGED_EMU_CACHE", Path.home() / ".cache" / "cupaged-emu"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _compile(src_path: Path, asan: bool, defines: dict | None) -> Path:
    src = src_path.read_text()
    kernels, dyn = find_kernels(src), find_dynamic_shared(src)
    flags = ["-std=c++17", "-O2", "-g", "-fPIC", "-fno-omit-frame-pointer", f"-I{CUDA_INCLUDE}",
             f"-I{src_path.parent}", "-Wno-attributes", "-pthread"]
    if asan:
        flags.append("-fsanitize=address")
    for k, v in sorted((defines or {}).items()):
        flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
    main_unit, smem_unit = _main_unit(src_path, kernels), _smem_unit(dyn)
    deps: set[Path] = set()
    _local_includes(src_path, deps)
    h = hashlib.sha256()
    for part in [src, main_unit, smem_unit, " ".join(flags), SHIM.read_text(),
                 (HERE / "cuda_emu_sched.h").read_text()] + [d.read_text() for d in sorted(deps)]:
        h.update(part.encode())
        h.update(b"\0")
    out = _cache_dir() / f"{src_path.stem}-{h.hexdigest()[:16]}{'-asan' if asan else ''}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        t = Path(tmp)
        (t / "main.cpp").write_text(main_unit)
        (t / "smem.cpp").write_text(smem_unit)
        cmds = [["g++", *flags, "-include", str(SHIM), "-x", "c++", "-c", str(t / "main.cpp"), "-o", str(t / "main.o")],
                ["g++", *flags, "-c", str(t / "smem.cpp"), "-o", str(t / "smem.o")],
                ["g++", *flags, "-shared", str(t / "main.o"), str(t / "smem.o"), "-o", str(t / "mod.so")]]
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise EmuError(f"emulation build of {src_path} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
        os.replace(t / "mod.so", out)
    return out


# ---- argument packing -------------------------------------------------------------------------------
def _dim3(v, what: str) -> _Dim3:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in t):
        raise EmuError(f"{what} must be 1 to 3 positive ints, got {v!r}")
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    return _Dim3(*t)


def _pack(kernel: str, i: int, code: str, a):
    where = f"{kernel}: argument {i} ({code})"
    if code.startswith("ptr:"):
        if a is None:
            return ctypes.c_void_p(0)
        if not isinstance(a, np.ndarray):
            raise EmuArgError(f"{where}: expected a numpy array or None, got {type(a).__name__}")
        if not a.flags.c_contiguous:
            raise EmuArgError(f"{where}: array is not C-contiguous (strides {a.strides}); pass np.ascontiguousarray(...)")
        want = _POINTEES.get(code[4:])
        if want and a.dtype.type not in want:
            raise EmuArgError(f"{where}: array dtype {a.dtype} does not match pointee {code[4:]} "
                              f"(expected {'/'.join(np.dtype(t).name for t in want)})")
        return ctypes.c_void_p(a.ctypes.data)
    if code in _SCALARS:
        t = _SCALARS[code]
        if type(a) is not t:
            raise EmuArgError(f"{where}: expected np.{np.dtype(t).name} scalar, got {type(a).__module__}."
                              f"{type(a).__name__} {a!r}; wrap it, e.g. np.{np.dtype(t).name}(...)")
        return ctypes.create_string_buffer(a.tobytes(), a.nbytes)
    if code.startswith("b") and code[1:].isdigit():
        raw = bytes(a) if isinstance(a, (bytes, bytearray)) else (a.tobytes() if isinstance(a, (np.ndarray, np.void)) else None)
        if raw is None or len(raw) != int(code[1:]):
            raise EmuArgError(f"{where}: expected {code[1:]} raw bytes (bytes or numpy record), got {a!r}")
        return ctypes.create_string_buffer(raw, len(raw))
    raise EmuArgError(f"{where}: unsupported parameter type")


def _has_asan_runtime() -> bool:
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def asan_env() -> dict:
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
               OPENBLAS_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


@dataclass
class AsanResult:
    returncode: int
    output: str
    value: object = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def asan_error(self) -> bool:
        return "ERROR: AddressSanitizer" in self.output


def run_under_asan(target: str, *args, timeout: float = 300) -> AsanResult:
    """Run `package.module:function(*args)` in a python subprocess with libasan preloaded.

    The function should load its modules with asan=True; its return value comes back pickled."""
    with tempfile.TemporaryDirectory() as tmp:
        io = Path(tmp) / "io.pkl"
        io.write_bytes(pickle.dumps((target, args)))
        code = "import sys; from tests.emu.harness import _asan_child; _asan_child(sys.argv[1])"
        r = subprocess.run([sys.executable, "-c", code, str(io)], cwd=ROOT, env=asan_env(), capture_output=True,
                           text=True, timeout=timeout)
        value = pickle.loads(io.read_bytes()) if r.returncode == 0 and io.stat().st_size else None
        return AsanResult(r.returncode, r.stdout + r.stderr, value)


def _asan_child(io_path: str) -> None:
    import importlib
    target, args = pickle.loads(Path(io_path).read_bytes())
    mod_name, func = target.split(":")
    fn = importlib.import_module(mod_name)
    for part in func.split("."):
        fn = getattr(fn, part)
    Path(io_path).write_bytes(pickle.dumps(fn(*args)))


def _kernels_in_child(src: str, defines):
    return load_module(src, asan=True, defines=defines).kernels


def _launch_in_child(src: str, defines, name, grid, block, args, shared_mem, schedule):
    mod = load_module(src, asan=True, defines=defines)
    mod.launch(name, grid=grid, block=block, args=args, shared_mem=shared_mem, schedule=schedule)
    return [a if isinstance(a, np.ndarray) else None for a in args]


# ---- the module -------------------------------------------------------------------------------------
class Module:
    """One compiled .cu file. `kernels` maps each extern "C" __global__ name to its signature."""

    def __init__(self, src: Path, so: Path, asan: bool, defines: dict | None):
        self.src, self.so, self.asan, self.defines = src, so, asan, defines
        self._lib = None
        self.kernels: dict[str, str] = {}
        if asan and not _has_asan_runtime():  # loading needs the ASan runtime: ask a child process
            r = run_under_asan("tests.emu.harness:_kernels_in_child", str(src), defines)
            if not r.ok:
                raise EmuError(f"cannot load the ASan build of {src.name}:\n{r.output[-4000:]}")
            self.kernels = r.value
            return
        self._load()

    def _load(self):
        lib = ctypes.CDLL(str(self.so), mode=ctypes.RTLD_LOCAL)
        lib.emu_last_error.restype = ctypes.c_char_p
        for k in find_kernels(self.src.read_text()):
            getattr(lib, f"emu_sig_{k}").restype = ctypes.c_char_p
            self.kernels[k] = getattr(lib, f"emu_sig_{k}")().decode()
            fn = getattr(lib, f"emu_launch_{k}")
            fn.argtypes = [_Dim3, _Dim3, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
            fn.restype = ctypes.c_int
        self._lib = lib

    def launch(self, name: str, grid, block, args, shared_mem: int = 0, schedule: str = "interleaved",
               workers: int | None = None) -> None:
        """Run kernel `name` over grid x block; raises EmuError on a CUDA-rule violation.

        schedule: "interleaved" (default), "warp_serial" or "reverse" -- adversarial thread orders.
        An asan=True module launched from a process without libasan runs the launch in a subprocess
        and copies the arrays back (raises EmuAsanError with the report)."""
        if self._lib is None:
            return self._launch_via_child(name, grid, block, args, shared_mem, schedule)
        if name not in self.kernels:
            raise EmuError(f"{self.src.name} has no extern \"C\" __global__ kernel {name!r}; has {sorted(self.kernels)}")
        codes = self.kernels[name].split(",") if self.kernels[name] else []
        if len(args) != len(codes):
            raise EmuArgError(f"{name} takes {len(codes)} arguments ({self.kernels[name]}), got {len(args)}")
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        if b.x * b.y * b.z > 1024 or b.z > 64:
            raise EmuError(f"{name}: block ({b.x},{b.y},{b.z}) exceeds 1024 threads (or z > 64)")
        if not 0 <= shared_mem <= MAX_DYN_SMEM:
            raise EmuError(f"{name}: dynamic shared memory {shared_mem} B outside [0, 227 KiB = {MAX_DYN_SMEM} B]")
        if schedule not in SCHEDULES:
            raise EmuError(f"unknown schedule {schedule!r}; one of {sorted(SCHEDULES)}")
        bufs = [_pack(name, i, c, a) for i, (c, a) in enumerate(zip(codes, args))]
        ptrs = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.addressof(x) for x in bufs])
        self._lib.emu_set_schedule(SCHEDULES[schedule])
        self._lib.emu_set_workers(int(workers or os.environ.get("CUPAGED_EMU_WORKERS", 0) or 0))
        if getattr(self._lib, f"emu_launch_{name}")(g, b, shared_mem, ptrs):
            raise EmuError(f"{self.src.name}:{name} grid=({g.x},{g.y},{g.z}) block=({b.x},{b.y},{b.z}): "
                           f"{self._lib.emu_last_error().decode()}")

    def _launch_via_child(self, name, grid, block, args, shared_mem, schedule):
        r = run_under_asan("tests.emu.harness:_launch_in_child", str(self.src), self.defines, name, grid, block,
                           list(args), shared_mem, schedule)
        if r.asan_error:
            raise EmuAsanError(f"{self.src.name}:{name}: AddressSanitizer report:\n{r.output[-8000:]}")
        if not r.ok:
            raise EmuError(f"{self.src.name}:{name} failed under ASan (rc {r.returncode}):\n{r.output[-8000:]}")
        for a, back in zip(args, r.value):
            if isinstance(a, np.ndarray):
                np.copyto(a, back)


_lock = threading.Lock()
_modules: dict[tuple, Module] = {}


def load_module(path, asan: bool = False, defines: dict | None = None) -> Module:
    """Compile (once, cached by content and flags) and load a .cu file for host emulation.

    path is absolute or relative to the repository root; defines maps macro -> value (None for a bare -D)."""
    src = Path(path)
    src = (src if src.is_absolute() else ROOT / src).resolve()
    key = (str(src), asan, tuple(sorted((defines or {}).items())))
    with _lock:
        so = _compile(src, asan, defines)
        mod = _modules.get(key)
        if mod is None or mod.so != so:
            mod = _modules[key] = Module(src, so, asan, defines)
        return mod
