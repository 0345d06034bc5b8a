"""Small files written safely: atomically (a reader or a crash sees the old file or the new one, never
half of one), with the permissions the user's umask gives any new file, and without pickle.

Every state file of a run (``result.json``, manifests, reports, cached data) goes through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (process-wide, but instantaneous).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync it, then rename it.

    ``os.replace`` is atomic on POSIX: a concurrent reader (another DDP rank, a colleague) and a crash
    (kill -9, disk full) leave either the previous file or the complete new one. The file gets the mode
    ``0o666 & ~umask`` like any file ``open(path, "w")`` creates (``mkstemp`` alone would make it 0600,
    so that a shared store or data cache would not open for colleagues).

    Raises:
        OSError: from the file system (e.g. ``ENOSPC`` when the disk is full); the temporary file
            is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """:func:`atomic_write` of ``data`` as indented JSON with a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike[str], *, what: str) -> Any:
    """``json.loads`` of ``path``, with an error that says which file is damaged.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        RuntimeError: if it is not valid UTF-8 JSON (a truncated or foreign file).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RuntimeError(f"The {what} {str(path)!r} is damaged (not valid JSON: {err}).") from err


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
