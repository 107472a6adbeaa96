"""The store interface: what the planner and executor need of a content-addressed store.

Keep it small so a shared store (fsspec/S3) can slot in beside the local one.
A *record* (action record) is the commit point of a step: written last, atomically.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol


@dataclass(frozen=True)
class Record:
    """A finished step in the store. ``outputs`` maps a relative path to {"digest", "size"}.

    ``committed`` is not stored: it is True on the record a :meth:`Store.commit` call returns when that
    call wrote it, False when the call found an earlier record for the key (and on records read back)."""

    key: str
    kind: str
    material: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    result: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    store_root: Path | None = None
    committed: bool = field(default=False, compare=False, repr=False)
    #: remote stores: ``fetch(digest, size)`` brings a missing object into the local cache (``store_root``)
    fetch: Any = field(default=None, compare=False, repr=False)

    def file(self, relpath: str) -> Path:
        """Path of the (read-only) stored object holding output ``relpath`` (always a local path; a remote
        store's record fetches the object into its cache on first use, and re-hashes a cached copy on its
        first use in each process: a damaged or tampered copy is replaced by the store's own)."""
        assert self.store_root is not None
        digest = self.outputs[relpath]["digest"]
        path = self.store_root / "objects" / digest[:2] / digest
        if self.fetch is not None:
            self.fetch(digest, self.outputs[relpath].get("size"))
        return path

    def digest(self, relpath: str) -> str:
        return self.outputs[relpath]["digest"]


@dataclass
class GcReport:
    records: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)
    bytes_freed: int = 0


class Store(Protocol):
    root: Path

    def has(self, key: str) -> bool: ...
    def get(self, key: str) -> Record | None: ...
    def verify(self, record: Record) -> list[str]: ...
    def lock(self, key: str) -> AbstractContextManager[None]: ...
    def staging(self, key: str) -> AbstractContextManager[Path]: ...
    def commit(self, key: str, staged: Path, *, kind: str, material: dict[str, Any], result: dict[str, Any],
               meta: dict[str, Any], overwrite: bool = False) -> Record:
        """Store the files under ``staged`` and the record for ``key``; return the record now stored.

        The first record committed for a key wins. Without ``overwrite``, committing a key that already
        has a valid record (one that parses and whose objects verify) keeps that record and its objects
        and returns it, with ``committed`` False; the staged files are not stored. Two processes racing
        to commit the same key cannot both win: the record is written create-only (locally a hard link
        of a complete temp file, which fails if the record exists; an S3 store uses a conditional PUT
        with ``If-None-Match: *``), and the loser gets the winner's record. ``overwrite`` (``--force``)
        replaces an existing record. A record that exists but is corrupt or has damaged objects is
        replaced either way. Objects go in first and the record last: the record is the commit point,
        so a crash at any moment leaves either no record or a complete one.
        """
        ...
    def drop(self, key: str) -> None: ...
    def records(self) -> Iterator[Record]: ...
    def gc(self, keep: set[str], dry_run: bool = False) -> GcReport: ...
    def read_state(self, spec_name: str) -> dict[str, Any]: ...
    def write_state(self, spec_name: str, state: dict[str, Any]) -> None: ...
