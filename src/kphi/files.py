"""File helpers every part of kphi shares: the cache root, atomic writes and file-name slugs."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["cache_root", "atomic_write_bytes", "atomic_write_text", "slug"]


def cache_root() -> Path:
    """Where kphi caches what it builds or downloads: ``$KPHI_CACHE`` if set, else ``~/.cache/kphi``.

    Prepared data lives under ``data/``, the phi-3 vocabulary under ``phi3-vocab/``.
    """
    env = os.environ.get("KPHI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kphi"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one.

    The bytes go to a temporary file beside ``path`` (same file system), are flushed to disk, and the file
    is renamed over ``path``; on any failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def slug(text: str, fallback: str = "x", max_length: int | None = None) -> str:
    """``text`` as a safe file-name part: letters, digits, ``-``, ``_`` and ``.``; anything else becomes ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")
    return (cleaned[:max_length] if max_length else cleaned) or fallback
