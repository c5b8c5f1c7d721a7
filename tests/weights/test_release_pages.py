"""release_pages drops a mapped tensor's pages from the resident set without changing what it reads,
and leaves every array that is not a read-only file mapping alone (DONTNEED would zero those)."""
from __future__ import annotations

import numpy as np

from cupaged.weights.loader import release_pages


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_mapped_pages_go_and_the_data_stays(tmp_path):
    data = np.random.default_rng(0).standard_normal(16 << 20 >> 2).astype(np.float32)  # 16 MiB
    data.tofile(tmp_path / "w.bin")
    mapped = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="r")[1000:]
    total = float(mapped.sum())
    before = resident_mib()
    release_pages(mapped)
    assert resident_mib() < before - 8  # most of the 16 MiB left the resident set
    assert float(mapped.sum()) == total and np.array_equal(mapped, data[1000:])


def test_other_arrays_are_left_alone(tmp_path):
    anonymous = np.arange(1 << 22, dtype=np.float32)
    release_pages(anonymous)
    release_pages(anonymous[10:])
    assert anonymous[123456] == 123456.0 and anonymous.sum() == np.arange(1 << 22, dtype=np.float64).sum()
    np.arange(8, dtype=np.float32).tofile(tmp_path / "rw.bin")
    writable = np.memmap(tmp_path / "rw.bin", dtype=np.float32, mode="r+")
    release_pages(writable)
    assert writable.tolist() == list(range(8))
