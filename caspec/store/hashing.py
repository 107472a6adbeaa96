"""Content hashing for the store and for cache keys.

Everything caspec caches is addressed by SHA-256: files by their bytes (streamed, so large
outputs never sit whole in memory) and structured values by the hash of their *canonical JSON*
form — sorted keys, no whitespace, UTF-8, floats as ``repr`` — so that equal values always hash
equal whatever order a dict was built in.  Values that JSON cannot say exactly are refused rather
than silently coerced: NaN/infinity, non-string dict keys (``{1: x}`` would collide with
``{"1": x}``) and types other than None/bool/int/float/str/list/tuple/dict.

Large files that are hashed again and again (model weights, CLIP checkpoints) go through a
*digest cache* (:func:`cached_sha256`, :func:`cached_sha256_files`): a JSON file mapping a file's
resolved path to its size, ``mtime_ns`` and sha256. An entry is trusted only while size and
mtime match, and never for a file modified in the last :data:`RACY_NS` (two seconds): file times
are coarser than a nanosecond on many file systems, so a quick rewrite of the same size could keep
its mtime (git's "racily clean" case). Such files are hashed afresh and not cached.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

CHUNK_SIZE = 1 << 20  # 1 MiB
RACY_NS = 2_000_000_000
"""Files modified less than this long ago (ns) are always hashed afresh and never cached."""
DIGEST_CACHE_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _check_canonical(obj: Any, where: str = "$") -> None:
    """Raise ValueError/TypeError for anything without one exact JSON rendering."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"cannot hash non-finite float {obj!r} at {where}")
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_canonical(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"cannot hash dict key {k!r} at {where}: keys must be strings")
            _check_canonical(v, f"{where}.{k}")
        return
    raise TypeError(f"cannot hash value of type {type(obj).__name__} at {where}")


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, compact, UTF-8, floats by repr)."""
    _check_canonical(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of ``canonical_json(obj)``."""
    return sha256_bytes(canonical_json(obj))


# ---------------------------------------------------------------------------------------------
# the digest cache


def read_digest_cache(cache_file: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The cache's entries (resolved path -> ``{"size", "mtime_ns", "sha256"}``); ``{}`` if unreadable."""
    try:
        data = json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files", {}) if isinstance(data, dict) else {}
    return files if isinstance(files, dict) else {}


def write_digest_cache(cache_file: str | os.PathLike[str], fresh: dict[str, dict[str, Any]]) -> None:
    """Merge ``fresh`` entries into the cache (under a file lock, atomic rename). A cache that cannot be
    written is no error: it only saves time."""
    if not fresh:
        return
    from filelock import FileLock

    cache = Path(cache_file)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache) + ".lock", timeout=30):
            files = read_digest_cache(cache)
            files.update(fresh)
            fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=cache.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"version": DIGEST_CACHE_VERSION, "files": files}, fh, sort_keys=True)
                os.replace(tmp, cache)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except Exception:  # noqa: BLE001 - the cache is an optimisation only
        return


def _is_racy(st: os.stat_result, now_ns: int) -> bool:
    """Modified too recently (or in the future) for size + mtime to prove the content unchanged."""
    return now_ns - st.st_mtime_ns < RACY_NS


def cached_sha256_files(paths: Iterable[str | os.PathLike[str]],
                        cache_file: str | os.PathLike[str]) -> dict[Path, str]:
    """sha256 of each file in ``paths`` (keyed as given), reusing and updating the digest cache
    ``cache_file`` (one read, at most one write). Symlinks are followed (hub snapshots link into blobs/)."""
    cached = read_digest_cache(cache_file)
    fresh: dict[str, dict[str, Any]] = {}
    out: dict[Path, str] = {}
    for given in paths:
        path = Path(given)
        st = path.stat()
        key = str(path.resolve())
        now = time.time_ns()
        entry = cached.get(key)
        if (entry and not _is_racy(st, now) and entry.get("size") == st.st_size
                and entry.get("mtime_ns") == st.st_mtime_ns and isinstance(entry.get("sha256"), str)):
            out[path] = entry["sha256"]
            continue
        digest = sha256_file(path)
        after = path.stat()
        if not _is_racy(after, time.time_ns()) and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            fresh[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        out[path] = digest
    write_digest_cache(cache_file, fresh)
    return out


def cached_sha256(path: str | os.PathLike[str], cache_file: str | os.PathLike[str]) -> str:
    """sha256 of one file through the digest cache (see :func:`cached_sha256_files`)."""
    return cached_sha256_files([path], cache_file)[Path(path)]


__all__ = ["CHUNK_SIZE", "RACY_NS", "sha256_bytes", "sha256_file", "canonical_json", "sha256_json",
           "read_digest_cache", "write_digest_cache", "cached_sha256", "cached_sha256_files"]
