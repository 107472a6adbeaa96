"""Small file-system helpers shared across caspec: atomic writes (temp file in the same folder, fsync,
``os.replace``), so a reader never sees a half-written file."""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than this call)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``. The file gets the
    permissions an ordinary ``open(path, "w")`` would (``0o666`` less the umask), not ``mkstemp``'s private
    ``0o600``: locks, recipes, review manifests and catalogs are meant to be shared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
