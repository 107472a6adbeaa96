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
    """A finished step in the store. ``outputs`` maps a relative path to {"digest", "size"}."""

    key: str
    kind: str
    material: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    result: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    store_root: Path | None = None

    def file(self, relpath: str) -> Path:
        """Path of the (read-only) stored object holding output ``relpath``."""
        assert self.store_root is not None
        digest = self.outputs[relpath]["digest"]
        return self.store_root / "objects" / digest[:2] / digest

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
    def commit(self, key: str, staged: Path, *, kind: str, material: dict[str, Any], result: dict[str, Any], meta: dict[str, Any]) -> Record: ...
    def drop(self, key: str) -> None: ...
    def records(self) -> Iterator[Record]: ...
    def gc(self, keep: set[str], dry_run: bool = False) -> GcReport: ...
    def read_state(self, spec_name: str) -> dict[str, Any]: ...
    def write_state(self, spec_name: str, state: dict[str, Any]) -> None: ...
