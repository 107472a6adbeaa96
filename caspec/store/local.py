"""The local content-addressed store: a directory that caches every step's outputs.

Layout under the root (``.caspec/`` beside a spec by default)::

    VERSION                  store format version ("1"); a newer one is refused
    objects/ab/<sha256>      immutable blobs, mode 0o444, only ever complete files
    actions/ab/<key>.json    action records: the commit point of a step, written last
    locks/<key>.lock         per-key file locks (filelock); locks/.gc.lock guards gc
    tmp/<key>.<pid>.<rand>/  staging dirs of steps in progress
    state/<spec>.json        per-spec state (last run's step id -> key map, ...)

Crash safety: a step writes into a staging dir; :meth:`LocalStore.commit` hashes each
file, fsyncs it and renames it into ``objects/`` (never writing there in place), and only then
writes the record via temp file + fsync + ``os.link`` (create-only; ``os.replace`` when
overwriting).  A crash at any point leaves either no record or a complete one; leftovers (staging
dirs, unreferenced objects) are gc's job.

First record wins: ``commit`` without ``overwrite`` never replaces a valid record (see
:meth:`caspec.store.base.Store.commit`).  The hard link fails with EEXIST if the record exists, so two
processes racing to commit a key cannot both win.  Where the file system has no hard links, the
record is created with ``O_EXCL`` instead (a crash mid-write then leaves a truncated record, which
reads as corrupt, hence absent, and the next commit replaces it).

Decisions worth knowing:

* A corrupt or partial record (bad JSON, wrong shape) is treated as absent: ``has`` is False,
  ``get`` returns None and a :class:`CorruptRecordWarning` is issued; the next commit of the
  key overwrites it and gc removes it.  (Replacing a corrupt record is not race-free between
  processes that do not hold the key's lock: both may believe they replaced it.)  ``has`` therefore parses the (small) record; it never
  hashes objects.
* Read-only operations (has/get/verify/records/read_state, gc with dry_run) never create
  anything; the directories appear on the first write (staging/commit/lock/write_state/gc).
* ``lock`` is exclusive across processes and threads but not reentrant: nesting
  ``lock(k)`` inside ``lock(k)`` waits for the timeout.
* gc never removes lock files: they are empty, and unlinking a lock file another process
  is about to lock would let two processes hold "the same" lock.
* Commits hold a shared flock on ``locks/.gc.lock`` and gc an exclusive one, so gc can never
  delete an object that a commit in flight is about to reference (POSIX only).
* On dedup, an existing object is reused only if it still verifies; a damaged one is
  replaced by the fresh copy, so re-running a step heals the store.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import stat
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from ..errors import StoreError
from .base import GcReport, Record
from .common import (STORE_VERSION, CorruptRecord, CorruptRecordWarning, RecordLookups, check_key, check_spec_name,
                     encode_json, parse_record, pid_alive, record_body, reopen, scan_staged, valid_key)
from .faults import wrote
from .hashing import sha256_file

try:  # POSIX only; elsewhere gc and commits are not mutually excluded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

DEFAULT_LOCK_TIMEOUT = 6 * 3600.0
_SUBDIRS = ("objects", "actions", "locks", "tmp", "state")

# Staging dirs open in this process: gc must never remove them, lock or no lock.
_ACTIVE_STAGING: set[str] = set()


# --------------------------------------------------------------------------- helpers


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename in it is durable; silently skipped where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_copy(path: Path, data: bytes, durable: bool) -> str:
    """A complete temp file holding ``data`` beside ``path`` (``.<name>.<rand>.tmp``, fsynced if
    ``durable``, mode 0o644); its name. Removed again if writing fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir, fsync and os.replace."""
    tmp = _temp_copy(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _create_only_write(path: Path, data: bytes, durable: bool = True) -> bool:
    """Create ``path`` holding ``data`` unless it exists (then False, nothing written).

    A complete, fsynced temp file is hard-linked to ``path``: the link either fails (EEXIST) or makes
    the whole file appear at once, so racing writers cannot both succeed and no reader sees half a
    file. Without hard links, ``O_EXCL`` creation keeps the first-wins guarantee (a crash mid-write
    leaves a truncated file, which readers treat as corrupt)."""
    tmp = _temp_copy(path, data, durable)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except (AttributeError, NotImplementedError):  # pragma: no cover - no os.link here
            return _exclusive_write(path, data, durable)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _exclusive_write(path, data, durable)
    finally:
        with suppress(OSError):
            os.unlink(tmp)
    if durable:
        _fsync_dir(path.parent)
    return True


def _exclusive_write(path: Path, data: bytes, durable: bool) -> bool:
    """Create-only write with ``O_EXCL`` (for file systems without hard links)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    if durable:
        _fsync_dir(path.parent)
    return True


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, also one holding read-only subdirectories."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        with suppress(FileNotFoundError):
            os.unlink(path)
        return
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    with suppress(OSError):
        os.chmod(path, 0o700)
    for parent, dirs, _ in os.walk(path):
        for name in dirs:
            sub = os.path.join(parent, name)
            if not os.path.islink(sub):
                with suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _tree_size(path: Path) -> int:
    """Bytes held by a file or a tree of files (symlinks not followed)."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _parse_tmp_name(name: str) -> tuple[str | None, int | None]:
    """(key, pid) from a staging dir name ``<key>.<pid>.<rand>``; Nones if it is not one."""
    parts = name.split(".")
    if len(parts) != 3 or not valid_key(parts[0]) or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


# --------------------------------------------------------------------------- the store


class LocalStore(RecordLookups):
    """A content-addressed store in a local directory (see the module docstring)."""

    #: a verification result is cached only for files untouched this long (racy-timestamp guard)
    settle_ns = 2_000_000_000

    def __init__(self, root: str | os.PathLike[str], *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                 durable: bool = True):
        self.root = Path(os.path.abspath(root))
        self.lock_timeout = lock_timeout
        self.durable = durable
        self._version_ok = False
        self._ready = False
        self._verified: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def __reduce__(self) -> Any:
        """A store travels (to a Ray worker) as its address and settings; per-process state starts afresh."""
        return reopen, (LocalStore, str(self.root), {"lock_timeout": self.lock_timeout, "durable": self.durable})

    # ---------------------------------------------------------------- paths

    def _record_path(self, key: str) -> Path:
        return self.root / "actions" / key[:2] / f"{key}.json"

    def _object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def _lock_path(self, key: str) -> Path:
        return self.root / "locks" / f"{key}.lock"

    def _state_path(self, spec_name: str) -> Path:
        return self.root / "state" / f"{spec_name}.json"

    # ---------------------------------------------------------------- setup

    def _check_version(self) -> None:
        """Refuse a store written by a newer caspec; a missing VERSION is fine (new store)."""
        if self._version_ok:
            return
        path = self.root / "VERSION"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        if not text.isdigit():
            raise StoreError(f"store {self.root} has an unreadable VERSION file ({text[:20]!r})",
                             hint="is this directory really a caspec store?")
        if int(text) > STORE_VERSION:
            raise StoreError(
                f"store {self.root} has format version {text}, newer than this caspec supports ({STORE_VERSION})",
                hint="upgrade caspec, or use another store directory")
        self._version_ok = True

    def _ensure(self) -> None:
        """Create the store's directories and VERSION (first write only)."""
        if self._ready:
            return
        self._check_version()
        with self._oserrors("creating the store"):
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.root / "VERSION").exists():
                _atomic_write(self.root / "VERSION", f"{STORE_VERSION}\n".encode(), self.durable)
                wrote("VERSION")
            for name in _SUBDIRS:
                (self.root / name).mkdir(exist_ok=True)
        self._check_version()
        self._ready = True

    @contextmanager
    def _oserrors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StoreError(f"store {self.root}: {doing} failed: {exc}",
                             hint="check that the store directory is writable and the disk is not full") from exc

    @contextmanager
    def _gc_guard(self, shared: bool) -> Iterator[None]:
        """Shared for commits, exclusive for gc: gc never sees a half-made commit."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.root / "locks" / ".gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- records

    def _parse_record(self, key: str, data: bytes) -> Record:
        return parse_record(key, data, self.root)

    def _load_record(self, key: str, *, warn: bool) -> Record | None:
        path = self._record_path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot read action record {path}: {exc}") from exc
        try:
            return self._parse_record(key, data)
        except CorruptRecord as exc:
            if warn:
                warnings.warn(CorruptRecordWarning(f"ignoring corrupt action record {path}: {exc}"), stacklevel=3)
            return None

    def records(self) -> Iterator[Record]:
        """All valid records, in key order (corrupt ones skipped with a warning)."""
        self._check_version()
        actions = self.root / "actions"
        if not actions.is_dir():
            return
        for shard in sorted(actions.iterdir()):
            if not shard.is_dir():
                continue
            for path in sorted(shard.glob("*.json")):
                key = path.name[:-5]
                if valid_key(key) and (record := self._load_record(key, warn=True)) is not None:
                    yield record

    def drop(self, key: str) -> None:
        """Remove the record for ``key`` (its objects stay until gc)."""
        check_key(key)
        self._check_version()
        with self._oserrors(f"dropping {key}"):
            self._record_path(key).unlink(missing_ok=True)

    # ---------------------------------------------------------------- verification

    def _object_ok(self, path: Path, digest: str, size: int | None = None) -> bool:
        """Whether ``path`` is a regular file of ``size`` bytes hashing to ``digest``."""
        try:
            st = path.lstat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
            return False
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        cache_key = str(path)
        if self._verified.get(cache_key) == sig:
            return True
        try:
            ok = sha256_file(path) == digest
        except OSError:
            ok = False
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > self.settle_ns
        if ok and settled:
            self._verified[cache_key] = sig
        else:
            self._verified.pop(cache_key, None)
        return ok

    def verify(self, record: Record) -> list[str]:
        """Relpaths of ``record`` whose object is missing or no longer hashes to its digest.

        Re-hashes each object, except that a result is remembered in this process for files
        unchanged since (size, mtime, ctime, inode) and last touched over ``settle_ns`` ago.
        """
        self._check_version()
        bad = []
        for rel, entry in sorted(record.outputs.items()):
            if not self._object_ok(self._object_path(entry["digest"]), entry["digest"], entry.get("size")):
                bad.append(rel)
        return bad

    # ---------------------------------------------------------------- locks

    def _file_lock(self, key: str, timeout: float | None) -> FileLock:
        return FileLock(str(self._lock_path(key)), timeout=-1 if timeout is None else timeout)

    @contextmanager
    def lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the exclusive per-key lock (across processes); StoreError after the timeout.

        ``timeout`` defaults to the store's ``lock_timeout`` (6 hours; None waits forever).
        """
        check_key(key)
        self._ensure()
        wait = self.lock_timeout if timeout is None else timeout
        flock = self._file_lock(key, wait)
        try:
            flock.acquire()
        except Timeout:
            raise StoreError(f"timed out after {wait:g}s waiting for the lock on step key {key}",
                             hint=f"another caspec process may be running this step; lock file {self._lock_path(key)}") from None
        try:
            yield
        finally:
            flock.release()

    @contextmanager
    def try_lock(self, key: str) -> Iterator[bool]:
        """Take the per-key lock without waiting; yields True if held, False if someone else has it."""
        check_key(key)
        self._ensure()
        flock = self._file_lock(key, 0)
        try:
            flock.acquire()
        except Timeout:
            acquired = False
        else:
            acquired = True
        try:
            yield acquired
        finally:
            if acquired:
                flock.release()

    @contextmanager
    def _hold_if_free(self, key: str | None) -> Iterator[bool]:
        """For gc: like try_lock, but creates no lock file (no file means no holder)."""
        path = self._lock_path(key) if key else None
        if path is None or not path.exists():
            yield True
            return
        flock = FileLock(str(path), timeout=0)
        try:
            flock.acquire()
        except Timeout:
            acquired = False
        else:
            acquired = True
        try:
            yield acquired
        finally:
            if acquired:
                flock.release()

    # ---------------------------------------------------------------- staging and commit

    @contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A fresh dir ``tmp/<key>.<pid>.<rand>/`` for a step's outputs; removed on exit either way."""
        check_key(key)
        self._ensure()
        with self._oserrors("creating a staging dir"):
            path = Path(tempfile.mkdtemp(prefix=f"{key}.{os.getpid()}.", dir=self.root / "tmp"))
        _ACTIVE_STAGING.add(str(path))
        try:
            yield path
        finally:
            try:
                _remove(path)
            finally:
                _ACTIVE_STAGING.discard(str(path))

    def _copy_in(self, src: Path, dest: Path) -> None:
        """Move ``src`` to ``dest`` across filesystems: copy to the store's tmp/, then rename."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=".copy.")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o444)
            if self.durable:
                _fsync_file(Path(tmp))
            os.replace(tmp, dest)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        src.unlink()

    def _put_object(self, src: Path, digest: str, size: int) -> None:
        """Move a hashed staged file into objects/ (dedup: reuse an intact existing object)."""
        dest = self._object_path(digest)
        if self._object_ok(dest, digest, size):
            src.unlink()
            return
        dest.parent.mkdir(exist_ok=True)
        os.chmod(src, 0o444)
        if self.durable:
            _fsync_file(src)
        try:
            os.replace(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_in(src, dest)
        self._verified.pop(str(dest), None)
        wrote(f"object {digest[:12]}")

    def _write_record(self, path: Path, data: bytes, *, replace: bool = False) -> bool:
        """The commit point: write a record atomically; create-only unless ``replace``. False if a record
        file already existed (nothing written). Kept separate so tests can fail it."""
        path.parent.mkdir(exist_ok=True)
        if replace:
            _atomic_write(path, data, self.durable)
            wrote(f"record {path.stem[:12]}")
            return True
        created = _create_only_write(path, data, self.durable)
        if created:
            wrote(f"record {path.stem[:12]}")
        return created

    def _intact_record(self, key: str) -> Record | None:
        """The record for ``key`` if it parses and its objects verify (what a commit must not replace)."""
        record = self._load_record(key, warn=False)
        return record if record is not None and not self.verify(record) else None

    def commit(self, key: str, staged: Path, *, kind: str, material: dict[str, Any],
               result: dict[str, Any], meta: dict[str, Any] | None = None, overwrite: bool = False) -> Record:
        """Move every file under ``staged`` into objects/, then write the record (last); return the record
        now stored. The first record committed for a key wins unless ``overwrite``: see
        :meth:`caspec.store.base.Store.commit`."""
        check_key(key)
        self._check_version()
        files = scan_staged(Path(staged))
        with self._oserrors(f"hashing staged outputs of {key}"):
            outputs = {rel: {"digest": sha256_file(p), "size": p.stat().st_size} for rel, p in files}
        body = record_body(key, kind, material, outputs, result, meta)
        data = encode_json(body, f"the record of step key {key}")
        try:
            record = dataclasses.replace(self._parse_record(key, data), committed=True)
        except CorruptRecord as exc:
            raise StoreError(f"cannot commit step key {key}: {exc} (kind must be a str, material/result/meta dicts)") from None
        self._ensure()
        with self._oserrors(f"committing {key}"), self._gc_guard(shared=True):
            if not overwrite and (existing := self._intact_record(key)) is not None:
                return existing  # first record wins; the staged files stay where they are
            for rel, path in files:
                self._put_object(path, outputs[rel]["digest"], outputs[rel]["size"])
            if self.durable:
                for shard in {self._object_path(o["digest"]).parent for o in outputs.values()}:
                    _fsync_dir(shard)
            path = self._record_path(key)
            if overwrite or not self._write_record(path, data):
                if not overwrite and (existing := self._intact_record(key)) is not None:
                    return existing  # another process committed it while we stored our objects
                self._write_record(path, data, replace=True)  # overwrite, or the existing one is corrupt
        return record

    # ---------------------------------------------------------------- state

    def read_state(self, spec_name: str) -> dict[str, Any]:
        """The saved state of a spec, {} if none (or unreadable: CorruptRecordWarning)."""
        check_spec_name(spec_name)
        self._check_version()
        path = self._state_path(spec_name)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        try:
            state = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            state = None
        if not isinstance(state, dict):
            warnings.warn(CorruptRecordWarning(f"ignoring unreadable state file {path}"), stacklevel=2)
            return {}
        return state

    def write_state(self, spec_name: str, state: dict[str, Any]) -> None:
        """Replace the saved state of a spec atomically."""
        check_spec_name(spec_name)
        data = encode_json(state, f"the state of spec {spec_name}")
        self._ensure()
        with self._oserrors(f"writing the state of {spec_name}"), self._gc_guard(shared=True):
            _atomic_write(self._state_path(spec_name), data, self.durable)
        wrote(f"state {spec_name}")

    # ---------------------------------------------------------------- gc

    def gc(self, keep: set[str], dry_run: bool = False) -> GcReport:
        """Remove records not in ``keep``, then unreferenced objects, then stale staging dirs.

        A staging dir is stale unless it is open in this process, its owner pid is alive, or its
        key's lock is held.  ``temp_dirs`` also lists stray temp files of interrupted writes.
        With ``dry_run`` nothing is removed and the report says what would be.  Lock files are
        never removed (see the module docstring).
        """
        self._check_version()
        report = GcReport()
        if not self.root.is_dir():
            return report
        if dry_run:
            self._gc_scan(set(keep), report, dry_run=True)
            return report
        self._ensure()
        with self._oserrors("garbage collection"), self._gc_guard(shared=False):
            self._gc_scan(set(keep), report, dry_run=False)
        return report

    def _gc_scan(self, keep: set[str], report: GcReport, dry_run: bool) -> None:
        referenced = self._gc_records(keep, report, dry_run)
        self._gc_objects(referenced, report, dry_run)
        self._gc_tmp(report, dry_run)
        self._gc_stray_temp_files(self.root / "state", report, dry_run)

    def _discard(self, path: Path, report: GcReport, dry_run: bool) -> None:
        report.bytes_freed += _tree_size(path)
        if not dry_run:
            _remove(path)

    def _shards(self, name: str) -> Iterator[Path]:
        top = self.root / name
        if top.is_dir():
            yield from (p for p in sorted(top.iterdir()) if p.is_dir() and not p.is_symlink())

    def _gc_records(self, keep: set[str], report: GcReport, dry_run: bool) -> set[str]:
        """Drop records not kept (and corrupt ones); return the digests the rest reference."""
        referenced: set[str] = set()
        for shard in self._shards("actions"):
            self._gc_stray_temp_files(shard, report, dry_run)
            for path in sorted(shard.glob("*.json")):
                key = path.name[:-5]
                record = self._load_record(key, warn=False) if valid_key(key) else None
                if record is not None and key in keep:
                    referenced.update(o["digest"] for o in record.outputs.values())
                    continue
                report.records.append(key)
                self._discard(path, report, dry_run)
        return referenced

    def _gc_objects(self, referenced: set[str], report: GcReport, dry_run: bool) -> None:
        for shard in self._shards("objects"):
            for path in sorted(shard.iterdir()):
                if path.name not in referenced:
                    report.objects.append(path.name)
                    self._discard(path, report, dry_run)
                    self._verified.pop(str(path), None)

    def _gc_tmp(self, report: GcReport, dry_run: bool) -> None:
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        for path in sorted(tmp.iterdir()):
            if str(path) in _ACTIVE_STAGING:
                continue
            key, pid = _parse_tmp_name(path.name)
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                continue
            with self._hold_if_free(key) as free:
                if free:
                    report.temp_dirs.append(str(path))
                    self._discard(path, report, dry_run)

    def _gc_stray_temp_files(self, folder: Path, report: GcReport, dry_run: bool) -> None:
        """Temp files of atomic writes cut short (``.<name>.<rand>.tmp``)."""
        if not folder.is_dir():
            return
        for path in sorted(folder.glob(".*.tmp")):
            report.temp_dirs.append(str(path))
            self._discard(path, report, dry_run)


def open_store(path: str | os.PathLike[str], **options: Any) -> Any:
    """Open the store at ``path`` (nothing is created until the first write): a :class:`LocalStore` for a
    directory, a :class:`caspec.store.remote.RemoteStore` for an fsspec URL (``s3://bucket/prefix``, ...).
    fsspec is imported only for a URL, so local stores stay as fast to open as before."""
    location = os.fspath(path)
    if "://" in location:
        from .remote import RemoteStore

        return RemoteStore(location, **options)
    return LocalStore(path, **options)


def default_root(spec_path: str | os.PathLike[str]) -> Path:
    """The default store root for a spec file: ``.caspec/`` beside it."""
    return Path(os.path.abspath(spec_path)).parent / ".caspec"


__all__ = ["LocalStore", "CorruptRecordWarning", "open_store", "default_root", "STORE_VERSION",
           "DEFAULT_LOCK_TIMEOUT"]
