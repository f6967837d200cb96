"""File helpers every part of kphi shares: the cache root, atomic writes, slugs and output directories."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import KphiError

__all__ = [
    "cache_root", "atomic_write_bytes", "atomic_write_text", "slug", "refuse_foreign_dir", "staged_dir", "pip_download",
    "exclusive_lock",
]


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


class OutputDirError(KphiError, ValueError):
    """An output directory cannot be written: it is a file, or it holds something else."""


def refuse_foreign_dir(path: Path, holds_ours: bool, what: str, hint: str = "choose another directory") -> None:
    """A kphi output directory holds one kind of thing: refuse ``path`` (:class:`OutputDirError`) when it is
    non-empty and not ours.

    ``holds_ours`` says whether ``path`` already holds ``what`` (checked by the caller's own marker file);
    a missing or empty directory is always fine.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not holds_ours:
        raise OutputDirError(f"{path} is not empty and holds no {what}; refusing to write into it ({hint})")


@contextlib.contextmanager
def staged_dir(target: Path):
    """Build a directory beside ``target`` and put it in ``target``'s place only once complete.

    Yields an empty temporary sibling of ``target``. When the block ends normally the sibling replaces
    ``target`` (a previous ``target`` is moved aside first and removed after the swap, so readers see the
    old directory or the new one); when it raises, the sibling is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield staging
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        try:
            os.replace(staging, target)
        except OSError:
            if old is not None:
                os.replace(old / "previous", target)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = True):
    """Hold an exclusive advisory lock on the file ``path`` (created empty if missing) for the ``with`` block;
    yields whether it is held.

    ``wait=False`` yields ``False`` at once when another process holds the lock; ``wait=True`` blocks until it
    is free. The operating system drops a lock when its holder exits, killed or not, so a crashed process
    never leaves a stale one. The lock file itself is kept: deleting it would let a process that opened it
    just before the deletion lock a file no one else can see. Where ``fcntl`` is missing (Windows) every lock
    is granted at once and processes do not coordinate.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def pip_download(requirement: str, dest: Path, error: type[Exception], wheel: bool = False,
                 timeout: float = 1800) -> Path:
    """Download ``requirement`` (``"name==version"``) into ``dest`` with pip, without its dependencies; the
    path of the file pip wrote: a wheel when ``wheel``, else the source distribution (``.tar.gz``).

    ``pip download`` runs in a subprocess so that pip's own index configuration, proxies and cache apply.
    For a source distribution ``--no-binary`` is given for this one package only: its build requirements
    (which pip needs to read the sdist's metadata) may come as wheels, much faster than ``:all:``. Failures
    raise ``error`` with pip's last lines.
    """
    package = requirement.split("==")[0]
    kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", package]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *kind,
           "--dest", str(dest), requirement]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"could not download {requirement} with pip: {exc}") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise error(f"could not download {requirement} with pip (exit {done.returncode}): {tail}")
    pattern = "*.whl" if wheel else "*.tar.gz"
    found = sorted(Path(dest).glob(pattern))
    if not found:
        raise error(f"pip download of {requirement} produced no {pattern} in {dest}")
    return found[0]


def stat_fingerprint(files) -> str:
    """A short SHA-256 of each file's resolved path, size and modification time, in the order given: it
    changes when a file is edited, replaced or moved, without reading the contents (data files can be GBs)."""

    digest = hashlib.sha256()
    for f in map(Path, files):
        st = f.stat()
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]

