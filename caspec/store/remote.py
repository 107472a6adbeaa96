"""A store on object storage through fsspec: ``s3://bucket/prefix`` (s3fs), ``memory://``, ``file://``, ...

Same logical layout as the local store (:mod:`caspec.store.local`), under the URL::

    VERSION                  store format version; a newer one is refused
    objects/ab/<sha256>      immutable blobs, uploaded only if absent
    actions/ab/<key>.json    action records: the commit point, written last and create-only
    leases/<key>.json        best-effort leases of running keys (owner, host, pid, expiry)
    state/<spec>.json        per-spec state

and a local **read-through cache** (``$CASPEC_OBJECT_CACHE``, else ``$CASPEC_CACHE/remote-objects``, else
``~/.cache/caspec/remote-objects``; or the ``cache`` argument) holding fetched objects under
``objects/ab/<digest>``, plus ``tmp/`` (staging dirs), ``checkpoints/`` and ``logs/``. The cache is
the store's local ``root``: :meth:`Record.file` is a local path (a record read from the bucket fetches
a missing object into the cache on first use, so code that reads ``record.file`` without ``verify``
works). Objects are content-addressed, so one cache serves every remote store of a machine; an object is fetched at most once per machine, hashed on
download and written atomically (temp file + rename); a mismatch is a corrupt entry (``verify`` lists it)
and nothing is cached for it.

Commit: objects first (each uploaded unless the bucket already has one of the right size, younger than
half the gc grace period, that this process has not seen corrupt), then the record with a create-only write: ``fs.pipe_file(..., mode="create")``,
which s3fs sends as ``PutObject`` with ``If-None-Match: *`` (AWS S3, MinIO, R2, moto), so of two racing
writers exactly one wins; the loser returns the winner's record (``committed`` False). S3's 409
(ConditionalRequestConflict: another conditional write of the key in flight) counts as a lost race too: the
loser waits for the winner's record to be readable (:data:`RACE_WAITS`) and adopts it. On ``file://`` caspec
writes create-only itself (temporary file, then a hard link: atomic, never half-written). fsspec's generic
``mode="create"`` (most other backends) is an exists-check followed by a write, **not race-free**: such a
backend is refused unless ``CASPEC_ALLOW_UNSAFE_STORE=1`` says that one process at a time writes
(``memory://`` is race-free within one process). The loser's own uploaded objects (if any were new) stay
in the bucket unreferenced until gc; its staged files are removed with its staging dir.

Decisions worth knowing:

* Endpoint and credentials come only from the standard places (``AWS_*`` variables such as
  ``AWS_ENDPOINT_URL``, AWS config files, fsspec's configuration), never from the spec.
* Any network or permission failure is one :class:`StoreError` naming the URL; a failed ``verify`` (no
  answer from the server) is an error, never a "corrupt" entry, so a network blip does not drop records.
* ``lock`` takes a lease object (owner, host, pid, expiry ``lease_seconds`` ahead, default 120 s), renewed
  by a daemon thread every third of that while the step runs and deleted at exit. A lease past its expiry,
  or left on this host by a dead process, is taken over. It only saves duplicate work; correctness rests
  on the create-only record (two holders at once, after a missed renewal, just both run the step).
* ``gc``: a mark phase (digests of the kept records), then unreferenced objects older than the grace
  period (``gc_grace_seconds``, default 24 h) are deleted; see :meth:`RemoteStore.gc` for why a commit
  running meanwhile is safe. The local cache is never collected (delete the folder to reclaim it).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from ..errors import StoreError
from .base import GcReport, Record
from .common import (STORE_VERSION, CorruptRecord, RecordLookups, CorruptRecordWarning, check_key, check_spec_name,
                     encode_json, parse_record, pid_alive, record_body, reopen, scan_staged, valid_key)
from .faults import wrote
from .hashing import sha256_file

DEFAULT_LEASE_SECONDS = 120.0
DEFAULT_GC_GRACE_SECONDS = 24 * 3600.0
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0
LEASE_POLL_SECONDS = 1.0
RACE_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
"""Waits (s) for a racing writer's record to become readable after a lost conditional write."""
_HELD_LEASES: set[str] = set()  # owners of the leases this process holds now
_ATOMIC_CREATE = {"s3", "s3a", "memory"}  # protocols whose mode="create" is a real conditional write
_LOCAL_PROTOCOLS = {"file", "local"}  # caspec commits these create-only itself (temp file + hard link)
UNSAFE_ENV = "CASPEC_ALLOW_UNSAFE_STORE"
"""Set to 1 to use a backend without a create-only write anyway (one writer at a time, your responsibility)."""


def default_cache() -> Path:
    """The read-through object cache of this machine (see the module docstring)."""
    if os.environ.get("CASPEC_OBJECT_CACHE"):
        return Path(os.environ["CASPEC_OBJECT_CACHE"])
    base = os.environ.get("CASPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "caspec")
    return Path(base) / "remote-objects"


def redact_url(url: str) -> str:
    """``url`` as it may be shown: credentials (``s3://KEY:SECRET@bucket``) and query secrets replaced by ``***``."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        return str(url)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    path, q, query = path.partition("?")
    if q:
        query = "&".join(f"{kv.split('=', 1)[0]}=***" if "=" in kv else kv for kv in query.split("&"))
    return f"{scheme}://{netloc}{slash}{path}{q}{query}"


def _open_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and root path of ``url`` (a fresh instance: it sees the current AWS_* env)."""
    shown = redact_url(url)
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the ML stack
        raise StoreError(f"store {shown}: fsspec is not installed", hint="pip install 'caspec[s3]'") from None
    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        options["use_listings_cache"] = False
    elif protocol in ("file", "local"):
        options["auto_mkdir"] = True
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise StoreError(f"store {shown}: no fsspec backend for `{protocol}://` ({_redact_text(exc, url)})",
                         hint="for s3:// install the extra: pip install 'caspec[s3]'") from None
    except Exception as exc:  # noqa: BLE001 - backends raise anything (an unreachable ftp:// host: OSError)
        raise StoreError(f"store {shown}: cannot open it ({type(exc).__name__}: {_redact_text(exc, url)})",
                         hint="check the URL, the network and the credentials (from the environment, never the URL)"
                         ) from None
    return fs, path.rstrip("/")


def _redact_text(exc: Any, url: str) -> str:
    """An exception's text with the URL's credentials (if it repeats them) replaced."""
    text = str(exc)
    _, sep, rest = str(url).partition("://")
    netloc = rest.partition("/")[0]
    if sep and "@" in netloc:
        secret = netloc.rsplit("@", 1)[0]
        for part in {secret, *secret.split(":")}:
            if part:
                text = text.replace(part, "***")
    return text


class RepairedObjectWarning(UserWarning):
    """A cached object did not match its digest and was replaced by the store's copy."""


def _protocols(fs: Any) -> tuple[str, ...]:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def _is_atomic_create(fs: Any) -> bool:
    """Whether the backend's ``mode="create"`` is a real conditional write (caspec's own for local files)."""
    return any(p in _ATOMIC_CREATE or p in _LOCAL_PROTOCOLS for p in _protocols(fs))


class RemoteStore(RecordLookups):
    """A content-addressed store at an fsspec URL, with a local read-through cache (module docstring)."""

    #: the local ``root`` (the machine's object cache) is shared by every remote store of this machine, so
    #: nothing under it (checkpoints of other stores' running steps) is this store's to collect
    shares_root = True

    def __init__(self, url: str, *, cache: str | os.PathLike[str] | None = None,
                 lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, gc_grace_seconds: float = DEFAULT_GC_GRACE_SECONDS,
                 durable: bool = True):
        self.url = url.rstrip("/")
        self.shown = redact_url(self.url)  # what messages, reports and records may show
        self.fs, self.base = _open_fs(self.url)
        self.root = Path(os.path.abspath(cache if cache is not None else default_cache()))
        self.lock_timeout = lock_timeout
        self.lease_seconds = lease_seconds
        self.gc_grace_seconds = gc_grace_seconds
        self.durable = durable
        self._local = any(p in _LOCAL_PROTOCOLS for p in _protocols(self.fs))
        self.atomic_create = _is_atomic_create(self.fs)
        if not self.atomic_create and os.environ.get(UNSAFE_ENV, "").strip() not in ("1", "true", "yes"):
            raise StoreError(
                f"store {self.shown}: `{_protocols(self.fs)[0]}://` offers no create-only write, so two machines "
                "committing the same step could both win, and a reader could see a half-written record",
                hint=f"share a store on s3:// (If-None-Match), memory:// or a local folder; or set {UNSAFE_ENV}=1 "
                     "if only one process at a time ever writes to it")
        self._version_ok = False
        self._ready = False
        self._bad: set[str] = set()  # digests whose remote copy was found corrupt in this process
        self._verified: dict[str, tuple[int, ...]] = {}
        self.repaired: list[str] = []  # digests whose cached copy was damaged and replaced in this process

    def __repr__(self) -> str:
        return f"RemoteStore({self.shown!r}, cache={str(self.root)!r})"

    def __reduce__(self) -> Any:
        """A store travels (to a Ray worker) as its URL and settings; the worker uses its own machine's
        object cache (``default_cache`` there) and its own credentials."""
        options = {"lock_timeout": self.lock_timeout, "lease_seconds": self.lease_seconds,
                   "gc_grace_seconds": self.gc_grace_seconds, "durable": self.durable}
        return reopen, (RemoteStore, self.url, options)

    # ---------------------------------------------------------------- paths

    def _remote(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def _record_path(self, key: str) -> str:
        return self._remote("actions", key[:2], f"{key}.json")

    def _object_path(self, digest: str) -> str:
        return self._remote("objects", digest[:2], digest)

    def _lease_path(self, key: str) -> str:
        return self._remote("leases", f"{key}.json")

    def _state_path(self, spec_name: str) -> str:
        return self._remote("state", f"{spec_name}.json")

    def _cached_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    # ---------------------------------------------------------------- remote I/O

    @contextmanager
    def _io(self, doing: str, *, missing_ok: bool = True) -> Iterator[None]:
        """Turn any failure of the remote filesystem into one StoreError naming the URL. FileNotFoundError
        (and FileExistsError) pass through for the caller to handle where ``missing_ok`` (reads); on writes
        a missing path means a missing bucket, an error too."""
        try:
            yield
        except (StoreError, FileExistsError):
            raise
        except FileNotFoundError as exc:
            if missing_ok:
                raise
            self._fail(doing, exc)
        except Exception as exc:  # botocore/aiohttp errors are not OSErrors
            self._fail(doing, exc)

    def _fail(self, doing: str, exc: BaseException) -> None:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"store {self.shown}: {doing} failed: {detail}",
                         hint="check the endpoint (AWS_ENDPOINT_URL), the credentials and that the bucket "
                              "exists and is writable") from None

    def _read(self, path: str, doing: str) -> bytes | None:
        """The bytes at ``path``, None if there is no such object."""
        try:
            with self._io(doing):
                return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _write(self, path: str, data: bytes, doing: str, *, create: bool = False) -> bool:
        """Write ``data`` at ``path``; with ``create`` only if absent: False if it existed (S3's 412), or if
        another conditional write of it was in flight (S3's 409 ConditionalRequestConflict, which s3fs raises
        as an ``OSError``): either way another writer's object is, or is about to be, there."""
        try:
            with self._io(doing, missing_ok=False):
                if create and self._local:
                    _create_local(self.fs, path, data)
                elif create:
                    try:
                        self.fs.pipe_file(path, data, mode="create")
                    except OSError as exc:
                        if _is_conflict(exc):
                            raise FileExistsError(str(exc)) from None
                        raise
                else:
                    self.fs.pipe_file(path, data)
        except FileExistsError:
            return False
        wrote(path.rsplit("/", 2)[-2] if "/" in path else path)
        return True

    def _delete(self, path: str, doing: str) -> None:
        try:
            with self._io(doing):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _listing(self, folder: str, doing: str) -> list[str]:
        """Every file path under ``folder`` (recursively), [] if there is none."""
        try:
            with self._io(doing):
                self.fs.invalidate_cache()
                return sorted(self.fs.find(self._remote(folder)))
        except FileNotFoundError:
            return []

    # ---------------------------------------------------------------- setup

    def _check_version(self) -> None:
        if self._version_ok:
            return
        data = self._read(self._remote("VERSION"), "reading VERSION")
        if data is None:
            return
        text = data.decode("utf-8", "replace").strip()
        if not text.isdigit():
            raise StoreError(f"store {self.shown} has an unreadable VERSION file ({text[:20]!r})",
                             hint="is this location really a caspec store?")
        if int(text) > STORE_VERSION:
            raise StoreError(f"store {self.shown} has format version {text}, newer than this caspec supports "
                             f"({STORE_VERSION})", hint="upgrade caspec, or use another store location")
        self._version_ok = True

    def _ensure_cache(self) -> None:
        """The local cache dirs (the remote side is untouched)."""
        try:
            for name in ("objects", "tmp"):
                (self.root / name).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the object cache {self.root}: {exc}",
                             hint="set CASPEC_OBJECT_CACHE to a writable folder") from None

    def _ensure(self) -> None:
        """First write: the local cache dirs and the remote VERSION."""
        if self._ready:
            return
        self._check_version()
        self._ensure_cache()
        self._write(self._remote("VERSION"), f"{STORE_VERSION}\n".encode(), "writing VERSION", create=True)
        self._check_version()
        self._ready = True

    # ---------------------------------------------------------------- records

    def _parse(self, key: str, data: bytes) -> Record:
        """A record read back from the bucket: its files come from (and are fetched into) the local cache."""
        return dataclasses.replace(parse_record(key, data, self.root), fetch=self._fetch)

    def _load_record(self, key: str, *, warn: bool) -> Record | None:
        data = self._read(self._record_path(key), f"reading the record of {key}")
        if data is None:
            return None
        try:
            return self._parse(key, data)
        except CorruptRecord as exc:
            if warn:
                warnings.warn(CorruptRecordWarning(f"ignoring corrupt action record {self._record_path(key)}: {exc}"),
                              stacklevel=3)
            return None

    def records(self) -> Iterator[Record]:
        """All valid records, in key order (corrupt ones skipped with a warning)."""
        self._check_version()
        for path in self._listing("actions", "listing records"):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json") and valid_key(key := name[:-5]):
                if (record := self._load_record(key, warn=True)) is not None:
                    yield record

    def drop(self, key: str) -> None:
        """Remove the record for ``key`` (its objects stay)."""
        check_key(key)
        self._check_version()
        self._delete(self._record_path(key), f"dropping {key}")

    # ---------------------------------------------------------------- the read-through cache

    def _cache_ok(self, path: Path, digest: str, size: int | None) -> bool:
        """Whether the cached ``path`` is a file of ``size`` bytes hashing to ``digest`` (memoised per file)."""
        try:
            st = path.lstat()
        except OSError:
            return False
        if size is not None and st.st_size != size:
            return False
        sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        if self._verified.get(str(path)) == sig:
            return True
        try:
            ok = sha256_file(path) == digest
        except OSError:
            ok = False
        if ok:
            self._verified[str(path)] = sig
        else:
            self._verified.pop(str(path), None)
        return ok

    def _place_in_cache(self, src: Path, digest: str) -> None:
        """Move a hashed local file into the cache atomically (read-only)."""
        dest = self._cached_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o444)
        os.replace(src, dest)
        self._verified.pop(str(dest), None)

    def _fetch(self, digest: str, size: int | None) -> bool:
        """Make sure the object is in the cache and hashes right (download it if needed). False if the
        bucket has no such object or its bytes do not hash to ``digest`` (then nothing is cached). A cached
        copy that does not hash right (damaged, tampered) is replaced, said with a
        :class:`RepairedObjectWarning` and listed in :attr:`repaired`."""
        cached = self._cached_path(digest)
        if self._cache_ok(cached, digest, size):
            return True
        damaged = cached.exists()
        if not self._download(digest, size):
            return False
        if damaged:
            self.repaired.append(digest)
            warnings.warn(RepairedObjectWarning(f"the cached copy of object {digest[:12]} in {self.root} did not "
                                                "match its digest (damaged or tampered): replaced by the store's"),
                          stacklevel=3)
        return True

    def _download(self, digest: str, size: int | None) -> bool:
        """Download an object into the cache, hashed first; False if absent from the bucket or corrupt there."""
        self._ensure_cache()
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=f".fetch.{digest[:12]}.")
        os.close(fd)
        try:
            try:
                with self._io(f"downloading object {digest[:12]}"):
                    self.fs.get_file(self._object_path(digest), tmp)
            except FileNotFoundError:
                return False
            if sha256_file(Path(tmp)) != digest or (size is not None and os.path.getsize(tmp) != size):
                self._bad.add(digest)
                return False
            self._place_in_cache(Path(tmp), digest)
            return True
        finally:
            with suppress(OSError):
                os.unlink(tmp)

    def verify(self, record: Record) -> list[str]:
        """Relpaths of ``record`` whose object is missing from the bucket or does not hash to its digest;
        every other object is in the local cache afterwards (fetched once per machine). Cached copies that
        had to be replaced are reported (:attr:`repaired`, :class:`RepairedObjectWarning`)."""
        self._check_version()
        return [rel for rel, entry in sorted(record.outputs.items())
                if not self._fetch(entry["digest"], entry.get("size"))]

    # ---------------------------------------------------------------- leases

    def _lease_body(self, owner: str) -> bytes:
        return encode_json({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                            "expires": time.time() + self.lease_seconds}, "a lease")

    def _lease_holder(self, key: str) -> dict[str, Any] | None:
        """The lease on ``key`` if one is held: not expired, and not left by a dead process of this host
        (nor by this process outside a ``lock`` it holds)."""
        data = self._read(self._lease_path(key), f"reading the lease of {key}")
        if data is None:
            return None
        try:
            lease = json.loads(data.decode("utf-8"))
            expired = float(lease["expires"]) < time.time()
            pid = int(lease.get("pid", -1))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable: treat as expired
        if lease.get("host") == socket.gethostname() and lease.get("owner") not in _HELD_LEASES:
            if pid == os.getpid() or not pid_alive(pid):
                return None  # its holder is gone (crashed, or an earlier run in this process)
        return None if expired else lease

    def _try_lease(self, key: str, owner: str) -> bool:
        path, doing = self._lease_path(key), f"taking the lease of {key}"
        if self._write(path, self._lease_body(owner), doing, create=True):
            return True
        if self._lease_holder(key) is not None:
            return False
        self._write(path, self._lease_body(owner), doing)  # stale: take it over, then check we hold it
        held = self._lease_holder(key)
        return held is not None and held.get("owner") == owner

    def _renew_lease(self, key: str, owner: str, stop: threading.Event) -> None:
        """Push the lease's expiry forward every third of ``lease_seconds`` until ``stop`` (or it is lost)."""
        while not stop.wait(self.lease_seconds / 3):
            try:
                held = self._lease_holder(key)
                if held is not None and held.get("owner") != owner:
                    return  # taken over after we missed renewals: stop claiming it
                self._write(self._lease_path(key), self._lease_body(owner), f"renewing the lease of {key}")
            except StoreError:
                continue  # best effort: the lease only saves work

    def _release_lease(self, key: str, owner: str) -> None:
        with suppress(StoreError):
            held = self._lease_holder(key)
            if held is not None and held.get("owner") == owner:
                self._delete(self._lease_path(key), f"releasing the lease of {key}")

    @contextmanager
    def lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold a best-effort lease on ``key``, renewed while held (module docstring); StoreError after
        the timeout."""
        check_key(key)
        self._ensure()
        wait = self.lock_timeout if timeout is None else timeout
        owner = uuid.uuid4().hex
        deadline = None if wait is None else time.monotonic() + wait
        _HELD_LEASES.add(owner)  # ours from the moment it is written (so a re-read does not think it stale)
        try:
            while not self._try_lease(key, owner):
                if deadline is not None and time.monotonic() >= deadline:
                    raise StoreError(f"timed out after {wait:g}s waiting for the lease on step key {key}",
                                     hint=f"another caspec process may be running this step; lease {self._lease_path(key)}")
                time.sleep(LEASE_POLL_SECONDS)
        except BaseException:
            _HELD_LEASES.discard(owner)
            raise
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_lease, args=(key, owner, stop), daemon=True,
                                   name=f"caspec-lease-{key[:12]}")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=5)
            self._release_lease(key, owner)
            _HELD_LEASES.discard(owner)

    # ---------------------------------------------------------------- staging and commit

    @contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A fresh local dir (under the cache's tmp/) for a step's outputs; removed on exit either way."""
        check_key(key)
        self._ensure()
        path = Path(tempfile.mkdtemp(prefix=f"{key}.{os.getpid()}.", dir=self.root / "tmp"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _has_object(self, digest: str, size: int) -> bool:
        """Whether the bucket holds the object (right size, not seen corrupt, younger than half the gc grace
        period): then it is not uploaded."""
        if digest in self._bad:
            return False
        try:
            with self._io(f"checking object {digest[:12]}"):
                info = self.fs.info(self._object_path(digest))
        except FileNotFoundError:
            return False
        age = _age_seconds(info)
        if age is not None and age > self.gc_grace_seconds / 2:
            return False  # old enough for a concurrent gc to remove: upload it again (fresh timestamp)
        return info.get("size") == size

    def _put_object(self, src: Path, digest: str, size: int) -> None:
        """Upload a staged file unless the bucket has it, then move it into the local cache."""
        if not self._has_object(digest, size):
            with self._io(f"uploading object {digest[:12]}", missing_ok=False):
                self.fs.put_file(str(src), self._object_path(digest))
            self._bad.discard(digest)
            wrote(f"object {digest[:12]}")
        if self._cache_ok(self._cached_path(digest), digest, size):
            src.unlink()
        else:
            self._place_in_cache(src, digest)

    def _write_record(self, key: str, data: bytes, *, replace: bool = False) -> bool:
        """The commit point: write the record, create-only unless ``replace``; False if one existed.
        Kept separate so tests can fail it."""
        return self._write(self._record_path(key), data, f"committing the record of {key}", create=not replace)

    def _intact_record(self, key: str) -> Record | None:
        record = self._load_record(key, warn=False)
        return record if record is not None and not self.verify(record) else None

    def commit(self, key: str, staged: Path, *, kind: str, material: dict[str, Any],
               result: dict[str, Any], meta: dict[str, Any] | None = None, overwrite: bool = False) -> Record:
        """Upload every file under ``staged`` (objects first), then write the record create-only (last);
        return the record now stored. First record wins unless ``overwrite``: see
        :meth:`caspec.store.base.Store.commit`."""
        check_key(key)
        self._check_version()
        files = scan_staged(Path(staged))
        outputs = {rel: {"digest": sha256_file(p), "size": p.stat().st_size} for rel, p in files}
        data = encode_json(record_body(key, kind, material, outputs, result, meta), f"the record of step key {key}")
        try:
            record = dataclasses.replace(self._parse(key, data), committed=True)
        except CorruptRecord as exc:
            raise StoreError(f"cannot commit step key {key}: {exc} (kind must be a str, material/result/meta dicts)") from None
        self._ensure()
        if not overwrite and (existing := self._intact_record(key)) is not None:
            return existing  # first record wins; the staged files stay where they are
        for rel, path in files:
            self._put_object(path, outputs[rel]["digest"], outputs[rel]["size"])
        if overwrite:
            self._write_record(key, data, replace=True)
        elif not self._write_record(key, data):
            if (existing := self._winner(key)) is not None:
                return existing  # another writer committed it while we uploaded our objects
            self._write_record(key, data, replace=True)  # the existing record is corrupt (or never appeared)
        return record

    def _winner(self, key: str) -> Record | None:
        """After a lost create-only write: the other writer's record once it is readable and intact (it may
        still be in flight after a 409), None if it stays absent or is corrupt."""
        for delay in RACE_WAITS:
            record = self._load_record(key, warn=False)
            if record is not None:
                return record if not self.verify(record) else None
            time.sleep(delay)
        return None

    # ---------------------------------------------------------------- state

    def read_state(self, spec_name: str) -> dict[str, Any]:
        """The saved state of a spec, {} if none (or unreadable: CorruptRecordWarning)."""
        check_spec_name(spec_name)
        self._check_version()
        data = self._read(self._state_path(spec_name), f"reading the state of {spec_name}")
        if data is None:
            return {}
        try:
            state = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            state = None
        if not isinstance(state, dict):
            warnings.warn(CorruptRecordWarning(f"ignoring unreadable state file {self._state_path(spec_name)}"),
                          stacklevel=2)
            return {}
        return state

    def write_state(self, spec_name: str, state: dict[str, Any]) -> None:
        """Replace the saved state of a spec (one PUT: atomic on S3)."""
        check_spec_name(spec_name)
        data = encode_json(state, f"the state of spec {spec_name}")
        self._ensure()
        self._write(self._state_path(spec_name), data, f"writing the state of {spec_name}")

    def state_names(self) -> list[str]:
        """Names of the specs with saved state (for `caspec status` / `caspec gc`)."""
        names = (p.rsplit("/", 1)[-1] for p in self._listing("state", "listing spec states"))
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    # ---------------------------------------------------------------- gc

    def gc(self, keep: set[str], dry_run: bool = False) -> GcReport:
        """Remove records not in ``keep`` (and corrupt ones), then objects that no remaining record refers
        to and that are older than ``gc_grace_seconds`` (the grace period, as git's ``gc.pruneExpire``).

        Mark phase first: the digests of the kept records, listed before any object is looked at. A
        commit running meanwhile either uploads its objects (new: inside the grace period) or reuses one
        younger than half the grace period (an older one is uploaded again, see ``_has_object``), so gc
        never deletes an object that a record committed while it ran refers to, as long as a commit takes
        less than half the grace period. Objects of unknown age are kept. Stale leases go too. The
        local object cache is not touched."""
        self._check_version()
        report = GcReport()
        referenced = self._gc_records(set(keep), report, dry_run)
        self._gc_objects(referenced, report, dry_run)
        self._gc_leases(report, dry_run)
        return report

    def _gc_records(self, keep: set[str], report: GcReport, dry_run: bool) -> set[str]:
        referenced: set[str] = set()
        for path, info in self._detailed_listing("actions"):
            name = path.rsplit("/", 1)[-1]
            key = name[:-5] if name.endswith(".json") else ""
            record = self._load_record(key, warn=False) if valid_key(key) else None
            if record is not None and key in keep:
                referenced.update(o["digest"] for o in record.outputs.values())
                continue
            report.records.append(key or name)
            report.bytes_freed += int(info.get("size") or 0)
            if not dry_run:
                self._delete(path, f"removing record {name}")
        return referenced

    def _gc_objects(self, referenced: set[str], report: GcReport, dry_run: bool) -> None:
        for path, info in self._detailed_listing("objects"):
            digest = path.rsplit("/", 1)[-1]
            age = _age_seconds(info)
            if digest in referenced or age is None or age < self.gc_grace_seconds:
                continue
            report.objects.append(digest)
            report.bytes_freed += int(info.get("size") or 0)
            if not dry_run:
                self._delete(path, f"removing object {digest[:12]}")

    def _gc_leases(self, report: GcReport, dry_run: bool) -> None:
        for path, _ in self._detailed_listing("leases"):
            key = path.rsplit("/", 1)[-1][:-5]
            if valid_key(key) and self._lease_holder(key) is None:
                report.temp_dirs.append(path)
                if not dry_run:
                    self._delete(path, f"removing the stale lease of {key}")

    def _detailed_listing(self, folder: str) -> list[tuple[str, dict[str, Any]]]:
        try:
            with self._io(f"listing {folder}"):
                self.fs.invalidate_cache()
                found = self.fs.find(self._remote(folder), detail=True)
        except FileNotFoundError:
            return []
        return sorted(found.items())


def _create_local(fs: Any, path: str, data: bytes) -> None:
    """A create-only write on a local file system: the bytes go to a temporary file beside ``path``, which is
    then hard-linked to ``path`` (``FileExistsError`` if it exists): atomic, and never half-written."""
    target = Path(fs._strip_protocol(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, target)
    finally:
        with suppress(OSError):
            os.unlink(tmp)


def _is_conflict(exc: OSError) -> bool:
    """S3's 409 ConditionalRequestConflict on a conditional write, as s3fs raises it."""
    text = str(exc)
    return exc.errno == errno.EBUSY or "ConditionalRequestConflict" in text or "(409)" in text


def _age_seconds(info: dict[str, Any]) -> float | None:
    """Seconds since an object was last written, from an fsspec info dict; None if it does not say."""
    for name in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return time.time() - value.timestamp()
        with suppress(TypeError, ValueError):
            return time.time() - float(value)
    return None


__all__ = ["RemoteStore", "default_cache", "DEFAULT_LEASE_SECONDS"]
