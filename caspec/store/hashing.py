"""Content hashing for the store and for cache keys.

Everything caspec caches is addressed by SHA-256: files by their bytes (streamed, so large
outputs never sit whole in memory) and structured values by the hash of their *canonical JSON*
form — sorted keys, no whitespace, UTF-8, floats as ``repr`` — so that equal values always hash
equal whatever order a dict was built in.  Values that JSON cannot say exactly are refused rather
than silently coerced: NaN/infinity, non-string dict keys (``{1: x}`` would collide with
``{"1": x}``) and types other than None/bool/int/float/str/list/tuple/dict.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

CHUNK_SIZE = 1 << 20  # 1 MiB


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


__all__ = ["CHUNK_SIZE", "sha256_bytes", "sha256_file", "canonical_json", "sha256_json"]
