"""Helpers shared by the store backends (local directory, fsspec/S3): key and name checks, the record
format (encoding and parsing), and the scan of a staging dir. No I/O on a store happens here."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .base import Record

STORE_VERSION = 1
RECORD_FORMAT = 1
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{2,200}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class CorruptRecordWarning(UserWarning):
    """A record or state file in the store could not be parsed and is being ignored."""


class CorruptRecord(Exception):
    """A record file that does not parse into a valid record."""


def valid_key(key: object) -> bool:
    return isinstance(key, str) and KEY_RE.match(key) is not None


def check_key(key: str) -> None:
    if not valid_key(key):
        raise StoreError(f"invalid store key {key!r}", hint="keys are 2-200 characters of [A-Za-z0-9_-]")


def check_spec_name(name: str) -> None:
    bad = not isinstance(name, str) or not name or name.startswith(".")
    if bad or any(c in name for c in "/\\\0"):
        raise StoreError(f"invalid spec name for store state: {name!r}")


def pid_alive(pid: int) -> bool:
    """Whether a local process ``pid`` exists (conservatively True where we cannot tell)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would kill it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def encode_json(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serialisable: {exc}") from exc
    return (text + "\n").encode("utf-8")


def record_body(key: str, kind: str, material: dict[str, Any], outputs: dict[str, Any],
                result: dict[str, Any], meta: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "key": key, "kind": kind, "material": material,
            "outputs": outputs, "result": result, "meta": meta or {}}


def parse_record(key: str, data: bytes, store_root: Path | None) -> Record:
    """The record for ``key`` in ``data``; CorruptRecord if it is not a valid one."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecord(f"not valid JSON ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT or obj.get("key") != key:
        raise CorruptRecord("missing or wrong format/key")
    if not isinstance(obj.get("kind"), str):
        raise CorruptRecord("missing kind")
    for name in ("material", "outputs", "result", "meta"):
        if not isinstance(obj.get(name), dict):
            raise CorruptRecord(f"missing {name}")
    outputs = {}
    for rel, entry in obj["outputs"].items():
        ok = isinstance(entry, dict) and isinstance(entry.get("digest"), str) and DIGEST_RE.match(entry["digest"])
        if not ok or not isinstance(entry.get("size"), int) or entry["size"] < 0:
            raise CorruptRecord(f"bad output entry {rel!r}")
        outputs[rel] = {"digest": entry["digest"], "size": entry["size"]}
    return Record(key=key, kind=obj["kind"], material=obj["material"], outputs=outputs,
                  result=obj["result"], meta=obj["meta"], store_root=store_root)


def scan_staged(root: Path) -> list[tuple[str, Path]]:
    """All regular files under ``root`` as (relpath with '/', path); StoreError on anything else."""
    if root.is_symlink() or not root.is_dir():
        raise StoreError(f"staged outputs {root} is not a directory")
    found: list[tuple[str, Path]] = []
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    raise StoreError(f"staged output `{rel}` is a symlink", hint="steps must write regular files")
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    found.append((rel, Path(entry.path)))
                else:
                    raise StoreError(f"staged output `{rel}` is not a regular file", hint="steps must write regular files")
    return sorted(found)


class RecordLookups:
    """``has`` and ``get`` as every store answers them, on top of the store's own ``_check_version()`` and
    ``_load_record(key, warn=...)`` (None when the record is absent or corrupt)."""

    def _check_version(self) -> None:  # pragma: no cover - provided by the store
        raise NotImplementedError

    def _load_record(self, key: str, *, warn: bool) -> Record | None:  # pragma: no cover - provided by the store
        raise NotImplementedError

    def has(self, key: str) -> bool:
        """Whether a valid record exists for ``key`` (reads the record; never hashes or fetches objects).

        A malformed key (e.g. "") is simply absent here; writing ops raise StoreError for it.
        """
        if not valid_key(key):
            return False
        self._check_version()
        return self._load_record(key, warn=True) is not None

    def get(self, key: str) -> Record | None:
        """The record for ``key``, or None if absent, malformed or corrupt (corrupt: CorruptRecordWarning)."""
        if not valid_key(key):
            return None
        self._check_version()
        return self._load_record(key, warn=True)


def reopen(cls: type, location: str, options: dict[str, Any]) -> Any:
    """Unpickle a store: open ``cls`` at ``location`` afresh (stores' ``__reduce__``)."""
    return cls(location, **options)

