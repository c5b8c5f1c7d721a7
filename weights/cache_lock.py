"""What keeps the model cache to one entry per model: a lock per entry, and GGUF files known by content.

- ``entry_lock(name)``: an exclusive ``flock`` on ``<home>/locks/<name>.lock`` held while an entry is
  downloaded and converted, so a second process that wants the same model waits for the first one's
  conversion and then uses it instead of converting a second copy. The kernel drops the lock when
  its holder exits, also on a crash or Ctrl-C.
- ``gguf_sha256(path)``: a GGUF is named by the sha256 of its bytes, so every path to the same file
  (a copy, a symlink, the catalog's own file) finds the same cache entry. Hashes are remembered in
  ``<home>/gguf-hashes.json`` under (real path, size, mtime), so a large file is read once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, conversions still publish atomically
    fcntl = None

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def _lock_path(home: Path, name: str) -> Path:
    root = home / "locks"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{name}.lock"


@contextlib.contextmanager
def entry_lock(home: Path, name: str) -> Iterator[None]:
    """Hold the cache entry ``name`` exclusively; waits (saying so) while another process holds it."""
    if fcntl is None:
        yield
        return
    with open(_lock_path(home, name), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another cupaged process is fetching or converting %s; waiting for it", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def busy_entries(home: Path) -> list[str]:
    """The entries whose lock another process holds now (being fetched or converted)."""
    root = home / "locks"
    if fcntl is None or not root.is_dir():
        return []
    busy = []
    for path in sorted(root.glob("*.lock")):
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                busy.append(path.stem)
    return busy


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def gguf_sha256(home: Path, path: Path) -> str:
    """The sha256 of a GGUF file's bytes, read once per (real path, size, mtime)."""
    real = path.resolve()
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    index_path = home / "gguf-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    if key not in index:
        index[key] = file_sha256(real)
        home.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=0))
        os.replace(tmp, index_path)  # concurrent writers: the last one wins, every version is valid
    return index[key]
