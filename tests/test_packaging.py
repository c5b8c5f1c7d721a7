"""The wheel carries the kernels, the CLI and the weights code, and installs a `cupaged` script."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True)
    return next(out.glob("cupaged-*.whl"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in [*(ROOT / "cuda").glob("*.cu"), *(ROOT / "cuda").glob("*.cuh")]:
        assert f"cupaged/cuda/{kernel.name}" in names
    for module in ("cupaged/cli/main.py", "cupaged/cli/chat.py", "cupaged/weights/store.py",
                   "cupaged/weights/convert_gguf.py", "cupaged/engine/engine.py", "cupaged/backend/cpu.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cupaged = cupaged.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_from_another_directory(wheel, tmp_path):
    """A non-editable install into its own folder, used from elsewhere, is complete on its own."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import cupaged, cupaged.cli.main as m, cupaged.weights.store as s; "
            "assert str(cupaged.__file__).startswith(%r), cupaged.__file__; "
            "from click.testing import CliRunner; r = CliRunner().invoke(m.main, ['--help']); "
            "assert r.exit_code == 0 and 'chat' in r.output; print('ok')" % str(target))
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_store_and_engine_import_without_gguf():
    """A device image without gguf still loads converted weights (and the test suite's conftest):
    gguf is imported only when a GGUF file is converted."""
    code = ("import sys; sys.modules['gguf'] = None; "  # any `import gguf` now raises ImportError
            "import cupaged.weights.store, cupaged.engine.engine, tests.conftest")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
