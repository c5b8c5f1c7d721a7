"""The source CupyDevice gives NVRTC: each cuda/*.cu with its local headers spliced in, so that CuPy's
kernel cache (keyed on the source string) sees a header change. Checked with nvcc's preprocessor from a
folder that holds no header, so nothing can resolve through an include path."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cupaged.backend.cupy_device import inline_headers
from cupaged.backend.kernels import source_path

SOURCES = sorted(p.name for p in source_path("layernorm.cu").parent.glob("*.cu"))


@pytest.mark.parametrize("name", SOURCES)
def test_local_headers_are_spliced_in(name, tmp_path):
    text = inline_headers(name)
    local = [m for m in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M)]
    assert not local, f"{name}: local includes left: {local}"
    if '#include "common.cuh"' in source_path(name).read_text():
        assert "common.cuh (inlined)" in text
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src = Path(tmp_path) / name
    src.write_text(text)
    out = subprocess.run([nvcc, "-E", "-std=c++17", str(src), "-o", str(tmp_path / "pre.i")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_header_change_changes_the_source(monkeypatch):
    import cupaged.backend.cupy_device as cd
    before = inline_headers("layernorm.cu")
    real = cd.source_text

    def edited(file: str) -> str:
        return real(file) + ("\n// edited" if file == "common.cuh" else "")

    monkeypatch.setattr(cd, "source_text", edited)
    assert inline_headers("layernorm.cu") != before


def test_the_graph_pool_does_not_keep_the_device_alive():
    """Dropping a CupyDevice frees it at once (no reference cycle through its graph pool's allocator)."""
    import weakref

    pytest.importorskip("cupy")
    from cupaged.backend.cupy_device import CupyDevice, graph_memory_pool
    dev = object.__new__(CupyDevice)  # no GPU here: only the fields the pool involves
    dev._graph_memory = []
    dev._graph_pool = graph_memory_pool(dev._graph_memory)
    gone = weakref.ref(dev)
    del dev
    assert gone() is None
