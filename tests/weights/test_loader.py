"""Memory-mapped safetensors loading: single, sharded, bf16, corrupt files, pickle refusal, checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cupaged.errors import WeightsError
from cupaged.weights.loader import check_weights, open_weights


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "b.weight": rng.standard_normal((3,)).astype(np.float16),
        "c.bias": rng.integers(-5, 5, size=(2, 2, 2)).astype(np.int32),
    }


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A hand-made safetensors file (for dtypes NumPy cannot save, and for corruption)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_single_file_is_memory_mapped(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = open_weights(tmp_path)
    assert set(weights) == set(tensors)
    for name, array in tensors.items():
        got = weights[name]
        assert got.dtype == array.dtype and np.array_equal(got, array)
        assert isinstance(got.base, np.memmap) or isinstance(got, np.memmap)
        assert not got.flags.writeable
        assert weights.origin[name] == "model.safetensors"


def test_sharded_with_index(tmp_path):
    tensors = _tensors(1)
    save_file({"a.weight": tensors["a.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in ("b.weight", "c.bias")}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors",
                            "c.bias": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = open_weights(tmp_path)
    assert weights.origin == index["weight_map"]
    assert all(np.array_equal(weights[k], v) for k, v in tensors.items())


def test_sharded_index_errors(tmp_path):
    save_file({"a.weight": np.ones(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        open_weights(tmp_path)
    index["weight_map"] = {"a.weight": "model-00001-of-00002.safetensors", "ghost": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"'ghost'.*missing|model-00001-of-00002.safetensors: tensor 'ghost'"):
        open_weights(tmp_path)


def test_bf16_widens_exactly(tmp_path):
    values = np.array([[1.0, -2.5], [3.140625, 1e-3]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
    header = {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, bits.nbytes]}}
    _write_raw(tmp_path / "model.safetensors", header, bits.tobytes())
    weights = open_weights(tmp_path)
    assert weights.dtypes["w"] == "BF16" and weights.raw("w").dtype == np.uint16
    widened = weights["w"]
    assert widened.dtype == np.float32
    assert np.array_equal(widened, (values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32))
    assert widened[0].tolist() == [1.0, -2.5] and widened[1, 0] == 3.140625


def test_truncated_file(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="model.safetensors.*(truncated|corrupt)"):
        open_weights(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}",
                                     struct.pack("<Q", 6) + b"{nope}", struct.pack("<Q", 2) + b"[]"])
def test_corrupt_header(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(WeightsError, match="model.safetensors"):
        open_weights(tmp_path)


def test_wrong_length_entry(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    _write_raw(tmp_path / "model.safetensors", header, b"\0" * 12)
    with pytest.raises(WeightsError, match="'w'"):
        open_weights(tmp_path)


def test_pickle_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="pickle.*execute"):
        open_weights(tmp_path)


def test_safetensors_preferred_over_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    assert list(open_weights(tmp_path)) == ["x"]


def test_no_weights_or_no_dir(tmp_path):
    with pytest.raises(WeightsError, match="no weights"):
        open_weights(tmp_path)
    with pytest.raises(WeightsError, match="not found"):
        open_weights(tmp_path / "nope")


def test_check_weights(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = open_weights(tmp_path)
    expected = {"a.weight": ((8, 4), "F32"), "b.weight": ((3,), ("F16", "F32")), "c.bias": ((2, 2, 2), np.int32)}
    check_weights(weights, weights.origin, expected)
    check_weights(tensors, {k: "mem" for k in tensors}, expected)  # a plain dict works too
    with pytest.raises(WeightsError, match="missing tensor 'd.weight'"):
        check_weights(weights, weights.origin, expected | {"d.weight": ((1,), "F32")})
    with pytest.raises(WeightsError, match="unexpected tensor 'c.bias' in model.safetensors"):
        check_weights(weights, weights.origin, {k: v for k, v in expected.items() if k != "c.bias"})
    with pytest.raises(WeightsError, match=r"'a.weight' in model.safetensors has shape \[8, 4\], expected \[4, 8\]"):
        check_weights(weights, weights.origin, expected | {"a.weight": ((4, 8), "F32")})
    with pytest.raises(WeightsError, match="'b.weight' in model.safetensors has dtype F16"):
        check_weights(weights, weights.origin, expected | {"b.weight": ((3,), ["F32", "BF16"])})
