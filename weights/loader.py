"""Memory-mapped safetensors loading and weight checking, with no pickle.

A safetensors file is an 8-byte little-endian header length N, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw data,
which starts at byte 8 + N. We parse the header ourselves, validate every
entry against the file's length, and hand out NumPy views of one read-only
``np.memmap`` per file: nothing is copied into RAM up front, the OS pages
tensors in as they are read.

bfloat16: NumPy has no bf16. A BF16 tensor is mapped as uint16 (``raw``),
and ``Weights[name]`` widens it to float32 on access (``bits << 16``, exact),
which makes one float32 copy of that tensor only.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cupaged.errors import WeightsError
from cupaged.util import bf16_bits_to_float

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 << 20

# safetensors dtype -> NumPy dtype of the mapped array (BF16 mapped as its bits).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NUMPY_TO_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                        "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                        "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


class Weights(Mapping[str, np.ndarray]):
    """Read-only name -> array mapping over memory-mapped safetensors files.

    ``origin[name]`` is the file a tensor came from and ``dtypes[name]`` its
    safetensors dtype ("F32", "BF16", ...). ``weights[name]`` is a zero-copy
    memmap view, except for BF16 which is widened to float32 on access;
    ``raw(name)`` always gives the stored array.
    """

    def __init__(self, arrays: dict[str, np.ndarray], origin: dict[str, str], dtypes: dict[str, str]):
        self._arrays, self.origin, self.dtypes = arrays, origin, dtypes

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._arrays[name]
        return bf16_bits_to_float(np, array) if self.dtypes[name] == "BF16" else array

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def raw(self, name: str) -> np.ndarray:
        """The array as stored on disk (uint16 bits for BF16)."""
        return self._arrays[name]

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from the resident set, once a copy of it is all that is used."""
        release_pages(self._arrays[name])


_MADV_DONTNEED = 4


def release_pages(array: np.ndarray) -> None:
    """Drop the whole pages of a memory-mapped, read-only array from this process's resident set
    (Linux madvise MADV_DONTNEED). The file's data stays in the page cache and faults back in if the
    array is read again, so this only changes RSS, never contents. A no-op for any array that is not
    a view of a file mapping (on anonymous memory DONTNEED would zero it) and off Linux."""
    if sys.platform != "linux" or array.nbytes == 0 or not _is_file_mapped(array):
        return
    address, page = array.__array_interface__["data"][0], mmap.PAGESIZE
    lo, hi = -(-address // page) * page, (address + array.nbytes) // page * page
    if hi > lo:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _is_file_mapped(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        if isinstance(base.base, mmap.mmap):  # the np.memmap that owns the mapping
            return isinstance(base, np.memmap) and base.mode == "r"
        base = base.base
    return False


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The JSON header of a safetensors file, the data start offset and the file size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise WeightsError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def _entry_view(path: Path, name: str, entry: Any, data: np.memmap | None) -> tuple[np.ndarray, str]:
    """Validate one header entry against the data length and return its view."""
    try:
        dtype_name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: corrupt header entry for tensor {name!r}") from exc
    if dtype_name not in DTYPES:
        raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    dtype = DTYPES[dtype_name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    available = 0 if data is None else data.shape[0]
    if end - begin != nbytes or begin < 0 or end > available:
        raise WeightsError(
            f"{path}: tensor {name!r} needs bytes [{begin}, {end}) of {available} "
            f"({dtype_name} {list(shape)} is {nbytes} bytes): file truncated or corrupt"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype), dtype_name
    return data[begin:end].view(dtype).reshape(shape), dtype_name


def open_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map one safetensors file: (name -> array view, name -> dtype name)."""
    path = Path(path)
    header, start, size = _read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start else None
    arrays, dtypes = {}, {}
    for name, entry in header.items():
        arrays[name], dtypes[name] = _entry_view(path, name, entry, data)
    return arrays, dtypes


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory; refuses pickle-only checkpoints."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"model directory not found: {model_dir}")
    if (model_dir / INDEX_FILE).is_file():
        return [model_dir / f for f in sorted(set(_read_index(model_dir).values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles)}); cupaged refuses them because "
            "unpickling can execute arbitrary code. Convert them to safetensors first "
            "(e.g. load with transformers and save_pretrained(..., safe_serialization=True))."
        )
    raise WeightsError(f"{model_dir} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")


def _read_index(model_dir: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> file name) of a sharded checkpoint."""
    path = model_dir / INDEX_FILE
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path}: unreadable shard index ({exc})") from exc
    for name, fname in weight_map.items():
        if not (model_dir / fname).is_file():
            raise WeightsError(f"{path}: tensor {name!r} is in missing shard {fname}")
    return weight_map


def open_weights(model_dir: str | Path) -> Weights:
    """Memory-map every tensor of an HF-layout directory (single or sharded safetensors).

    Example::

        w = open_weights("~/.cache/cupaged/models/smollm2-135m-instruct")
        w["model.embed_tokens.weight"].shape   # (49152, 576), a read-only memmap view
        w.origin["model.norm.weight"]          # 'model.safetensors'
    """
    model_dir = Path(model_dir).expanduser()
    index = _read_index(model_dir) if (model_dir / INDEX_FILE).is_file() else None
    arrays: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    for path in weight_files(model_dir):
        file_arrays, file_dtypes = open_safetensors(path)
        for name, array in file_arrays.items():
            if index is not None and index.get(name) != path.name:
                continue  # the index decides which shard owns a tensor
            if name in arrays:
                raise WeightsError(f"tensor {name!r} appears in both {origin[name]} and {path.name}")
            arrays[name], origin[name], dtypes[name] = array, path.name, file_dtypes[name]
    if index is not None:
        for name, fname in index.items():
            if name not in arrays:
                raise WeightsError(f"{model_dir / fname}: tensor {name!r} listed in {INDEX_FILE} is missing")
    log.debug("mapped %d tensors from %s", len(arrays), model_dir)
    return Weights(arrays, origin, dtypes)


def _dtype_name(dtype: Any) -> str:
    """A safetensors dtype name ("F32") for a name or NumPy dtype."""
    text = str(dtype)
    if text.upper() in DTYPES:
        return text.upper()
    return NUMPY_TO_SAFETENSORS.get(str(np.dtype(dtype)), text)


def check_weights(
    tensors: Mapping[str, np.ndarray],
    origin: Mapping[str, str],
    expected: Mapping[str, tuple[tuple[int, ...], Any]],
) -> None:
    """Check names, shapes and dtypes against ``expected``; WeightsError on the first mismatch.

    ``expected[name] = (shape, allowed)`` where ``allowed`` is one dtype or a
    collection of dtypes, given as safetensors names ("F32", "BF16") or NumPy
    dtypes. A missing, unexpected, wrongly shaped or wrongly typed tensor
    raises WeightsError naming the tensor and its file.
    """
    missing = [name for name in expected if name not in tensors]
    if missing:
        files = ", ".join(sorted(set(origin.values()))) or "no file"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"missing tensor {missing[0]!r}{more}: not found in {files}")
    for name in tensors:
        where = origin.get(name, "?")
        if name not in expected:
            raise WeightsError(f"unexpected tensor {name!r} in {where}")
        shape, allowed = expected[name]
        stored = tensors.raw(name) if isinstance(tensors, Weights) else tensors[name]
        if tuple(stored.shape) != tuple(shape):
            raise WeightsError(f"tensor {name!r} in {where} has shape {list(stored.shape)}, expected {list(shape)}")
        dtype = tensors.dtypes[name] if isinstance(tensors, Weights) else _dtype_name(stored.dtype)
        if not isinstance(allowed, (list, tuple, set, frozenset)):
            allowed = [allowed]
        allowed_names = sorted({_dtype_name(a) for a in allowed})
        if dtype not in allowed_names:
            raise WeightsError(f"tensor {name!r} in {where} has dtype {dtype}, expected one of {allowed_names}")


def check_finite(weights: Weights, chunk: int = 1 << 24) -> None:
    """Raise WeightsError naming the first tensor (and its file) that holds a NaN or an infinity: such a
    checkpoint would load and then produce NaN logits at every step. Reads every float tensor once, in
    chunks (about 0.1 s per GB here), as stored: BF16 by its exponent bits."""
    for name in weights:
        dtype, raw = weights.dtypes[name], weights.raw(name).reshape(-1)
        if dtype not in ("F32", "F16", "BF16", "F64"):
            continue
        for start in range(0, raw.size, chunk):
            part = raw[start:start + chunk]
            bad = (part & 0x7F80) == 0x7F80 if dtype == "BF16" else ~np.isfinite(part)
            release_pages(part)  # read once here: the model's load faults in what it keeps
            if bad.any():
                index = start + int(np.argmax(bad))
                value = float(weights[name].reshape(-1)[index])
                raise WeightsError(f"{weights.origin[name]}: tensor {name!r} holds {value} at flat index {index}: "
                                   f"the checkpoint is corrupt (NaN or infinite weights)")
