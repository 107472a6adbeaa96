"""Tests for the local content-addressed store: commit/get, crash safety, locking, corruption, gc."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from caspec.errors import StoreError
from caspec.store import CorruptRecordWarning, LocalStore, Record, open_store
from caspec.store import local as local_mod
from caspec.store.hashing import canonical_json, sha256_bytes, sha256_file, sha256_json

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def produce(store: LocalStore, key: str, files: dict[str, bytes], result: dict | None = None,
            overwrite: bool = False) -> Record:
    """Stage ``files`` and commit them under ``key``."""
    with store.staging(key) as d:
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return store.commit(key, d, kind="test", material={"files": sorted(files)}, result=result or {}, meta={"m": 1},
                            overwrite=overwrite)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def spawn(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)  # reaped: its pid is gone, so gc may treat its leftovers as stale


def dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def read_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"child said nothing: {proc.stderr.read()}")
    return line


def assert_consistent(store: LocalStore) -> None:
    """Every record verifies and every object is referenced (call after gc)."""
    referenced = set()
    for record in store.records():
        assert store.verify(record) == [], record.key
        referenced.update(o["digest"] for o in record.outputs.values())
    on_disk = {p.name for p in all_files(store.root / "objects")}
    assert on_disk == referenced


# ----------------------------------------------------------------- hashing


def test_canonical_json_is_order_independent_and_strict():
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    assert sha256_json({"x": 1, "y": 2}) == sha256_json({"y": 2, "x": 1})
    assert canonical_json(0.1) == b"0.1"
    for bad in (math.nan, {"a": math.inf}, [-math.inf]):
        with pytest.raises(ValueError):
            canonical_json(bad)
    with pytest.raises(TypeError):
        canonical_json({1: "int key would collide with '1'"})
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})


def test_sha256_file_streams_large_files(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == sha256_bytes(data)


# ----------------------------------------------------------------- commit / get


def test_commit_then_get(store):
    rec = produce(store, "k1", {"a.txt": b"hello", "sub/b.bin": b"\x00" * 100}, result={"score": 0.5})
    got = store.get("k1")
    assert got == rec
    assert store.has("k1")
    assert got.outputs == {
        "a.txt": {"digest": sha256_bytes(b"hello"), "size": 5},
        "sub/b.bin": {"digest": sha256_bytes(b"\x00" * 100), "size": 100},
    }
    assert got.result == {"score": 0.5} and got.meta == {"m": 1} and got.kind == "test"
    assert got.file("a.txt").read_bytes() == b"hello"
    assert got.file("sub/b.bin").read_bytes() == b"\x00" * 100
    for rel in got.outputs:
        assert stat.S_IMODE(got.file(rel).stat().st_mode) & 0o222 == 0  # read-only
    assert store.verify(got) == []
    assert list((store.root / "tmp").iterdir()) == []  # staging dir gone
    raw = json.loads((store.root / "actions" / "k1" / "k1.json").read_text())
    assert raw["format"] == 1 and raw["key"] == "k1"
    assert (store.root / "VERSION").read_text().strip() == "1"
    assert [r.key for r in store.records()] == ["k1"]


def test_identical_content_is_stored_once(store):
    r1 = produce(store, "k1", {"x.png": b"same bytes"})
    r2 = produce(store, "k2", {"y.png": b"same bytes"})
    assert r1.digest("x.png") == r2.digest("y.png")
    assert len(all_files(store.root / "objects")) == 1
    assert store.verify(r1) == [] and store.verify(r2) == []


def test_dedup_heals_a_damaged_object(store):
    r1 = produce(store, "k1", {"x": b"precious"})
    obj = r1.file("x")
    os.chmod(obj, 0o644)
    obj.write_bytes(b"damaged!")
    r2 = produce(store, "k2", {"x": b"precious"})
    assert store.verify(r1) == [] and store.verify(r2) == []


def test_commit_rejects_symlinks_and_moves_nothing(store, tmp_path):
    (tmp_path / "target").write_text("t")
    with store.staging("k1") as d:
        (d / "ok.txt").write_text("ok")
        (d / "link").symlink_to(tmp_path / "target")
        with pytest.raises(StoreError, match="symlink"):
            store.commit("k1", d, kind="t", material={}, result={}, meta={})
        assert (d / "ok.txt").exists()
    assert not store.has("k1")
    assert all_files(store.root / "objects") == []


def test_commit_from_outside_the_store(store, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "f").write_bytes(b"data")
    rec = store.commit("k1", outside, kind="t", material={}, result={}, meta={})
    assert rec.file("f").read_bytes() == b"data"


def test_invalid_keys_and_unserialisable_results(store):
    for key in ("", "a", "../etc", "a/b", "a.b"):
        assert not store.has(key) and store.get(key) is None  # read side: just absent
        with pytest.raises(StoreError):
            store.drop(key)
        with pytest.raises(StoreError):
            with store.lock(key):
                pass
    with store.staging("k1") as d:
        (d / "f").write_text("x")
        with pytest.raises(StoreError, match="JSON"):
            store.commit("k1", d, kind="t", material={}, result={"bad": math.nan}, meta={})
    assert not store.has("k1")


# ----------------------------------------------------------------- crashes (simulated)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_inside_staging_leaves_nothing(store, exc):
    with pytest.raises(type(exc)):
        with store.staging("k1") as d:
            (d / "partial.bin").write_bytes(b"half")
            raise exc
    assert not store.has("k1")
    assert list((store.root / "tmp").iterdir()) == []
    assert all_files(store.root / "actions") == []


def test_crash_before_record_write_leaves_no_record(store, monkeypatch):
    def crash(path, data, **kw):
        raise KeyboardInterrupt("killed between objects and record")

    monkeypatch.setattr(store, "_write_record", crash)
    with pytest.raises(KeyboardInterrupt):
        produce(store, "k1", {"a": b"aaa"})
    assert not store.has("k1") and store.get("k1") is None
    assert len(all_files(store.root / "objects")) == 1  # orphan, left for gc
    report = store.gc(keep={"k1"})
    assert report.objects == [sha256_bytes(b"aaa")]
    assert_consistent(store)


def test_truncated_record_is_treated_as_absent(store):
    produce(store, "k1", {"a": b"aaa"})
    path = store.root / "actions" / "k1" / "k1.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(CorruptRecordWarning):
        assert not store.has("k1")
    with pytest.warns(CorruptRecordWarning):
        assert store.get("k1") is None
    with pytest.warns(CorruptRecordWarning):
        assert list(store.records()) == []
    rec = produce(store, "k1", {"a": b"aaa"})  # a re-run overwrites it
    assert store.get("k1") == rec


def test_corrupt_record_is_removed_by_gc_even_if_kept(store):
    produce(store, "k1", {"a": b"aaa"})
    (store.root / "actions" / "k1" / "k1.json").write_text('{"format": 1, "key": "k1"}')
    report = store.gc(keep={"k1"})
    assert report.records == ["k1"] and report.objects == [sha256_bytes(b"aaa")]


# ----------------------------------------------------------------- real kill -9

LOOP_CHILD = """
    import os, sys
    from caspec.store import LocalStore
    store = LocalStore(sys.argv[1])
    i = 0
    while True:
        key = f"loop{i:05d}"
        with store.lock(key):
            with store.staging(key) as d:
                (d / "noise.bin").write_bytes(os.urandom(200_000))
                (d / "shared.txt").write_text("same in every step")
                (d / "deep").mkdir()
                (d / "deep" / "n.txt").write_text(str(i))
                store.commit(key, d, kind="loop", material={"i": i}, result={"i": i}, meta={})
        print(i, flush=True)
        i += 1
"""


def test_kill9_during_commit_loop_leaves_store_consistent(store):
    for attempt in range(3):
        proc = spawn(LOOP_CHILD, store.root)
        for _ in range(3):
            read_line(proc)
        time.sleep(random.uniform(0, 0.02))
        kill9(proc)
        keys = {r.key for r in store.records()}
        for record in store.records():
            assert store.verify(record) == []
        store.gc(keep=keys)
        assert list((store.root / "tmp").iterdir()) == []
        assert_consistent(store)
    assert len(keys) >= 3


STUCK_IN_STAGING_CHILD = """
    import sys, time
    from caspec.store import LocalStore
    store = LocalStore(sys.argv[1])
    with store.lock("stuck"):
        with store.staging("stuck") as d:
            (d / "half.bin").write_bytes(b"x" * 1000)
            print(d, flush=True)
            time.sleep(120)
"""


def test_kill9_inside_staging_then_gc_cleans_tmp(store):
    proc = spawn(STUCK_IN_STAGING_CHILD, store.root)
    staging_dir = Path(read_line(proc))
    try:
        report = store.gc(keep=set())  # the step is running: its staging dir must survive
        assert report.temp_dirs == [] and staging_dir.is_dir()
    finally:
        kill9(proc)
    assert staging_dir.is_dir() and not store.has("stuck")
    report = store.gc(keep=set(), dry_run=True)
    assert report.temp_dirs == [str(staging_dir)] and report.bytes_freed == 1000
    assert staging_dir.is_dir()
    report = store.gc(keep=set())
    assert report.temp_dirs == [str(staging_dir)] and report.bytes_freed == 1000
    assert not staging_dir.exists()


KILLED_BEFORE_RECORD_CHILD = """
    import sys, time
    from caspec.store import LocalStore
    store = LocalStore(sys.argv[1])
    def stall(path, data, **kw):
        print("objects-moved", flush=True)
        time.sleep(120)
    store._write_record = stall
    with store.staging("k1") as d:
        (d / "a.bin").write_bytes(b"a" * 500)
        store.commit("k1", d, kind="t", material={}, result={}, meta={})
"""


def test_kill9_between_objects_and_record(store):
    proc = spawn(KILLED_BEFORE_RECORD_CHILD, store.root)
    assert read_line(proc) == "objects-moved"
    kill9(proc)
    assert not store.has("k1")
    assert len(all_files(store.root / "objects")) == 1
    report = store.gc(keep={"k1"})
    assert report.objects == [sha256_bytes(b"a" * 500)] and len(report.temp_dirs) == 1
    assert all_files(store.root / "objects") == [] and list((store.root / "tmp").iterdir()) == []


# ----------------------------------------------------------------- concurrency

RACE_CHILD = """
    import os, sys, time
    from caspec.store import LocalStore
    root, key, counter, go = sys.argv[1:5]
    store = LocalStore(root)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    with store.lock(key):
        if not store.has(key):
            fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, f"{os.getpid()}\\n".encode())
            os.close(fd)
            with store.staging(key) as d:
                time.sleep(0.2)
                (d / "out.txt").write_text("made once")
                store.commit(key, d, kind="race", material={}, result={"pid": os.getpid()}, meta={})
    print("done", flush=True)
"""


def test_racing_processes_produce_exactly_once(store, tmp_path):
    counter, go = tmp_path / "counter", tmp_path / "go"
    procs = [spawn(RACE_CHILD, store.root, "racekey", counter, go) for _ in range(4)]
    for proc in procs:
        assert read_line(proc) == "ready"
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    lines = counter.read_text().splitlines()
    assert len(lines) == 1
    record = store.get("racekey")
    assert record.result == {"pid": int(lines[0])}
    assert store.verify(record) == [] and record.file("out.txt").read_text() == "made once"


def test_first_commit_wins_and_keeps_its_objects(store):
    first = produce(store, "k1", {"a": b"first", "b": b"same"}, result={"n": 1})
    assert first.committed
    second = produce(store, "k1", {"a": b"second", "b": b"same"}, result={"n": 2})
    assert not second.committed
    assert second == first and second.result == {"n": 1}  # the caller gets the winner's record
    assert store.get("k1").file("a").read_bytes() == b"first"
    assert {p.name for p in all_files(store.root / "objects")} == {sha256_bytes(b"first"), sha256_bytes(b"same")}
    assert list((store.root / "tmp").iterdir()) == []  # the loser's staged files went with its staging dir
    assert store.verify(first) == []


def test_overwrite_replaces_the_record(store):
    produce(store, "k1", {"a": b"first"})
    forced = produce(store, "k1", {"a": b"forced"}, overwrite=True)
    assert forced.committed
    assert store.get("k1") == forced and store.get("k1").file("a").read_bytes() == b"forced"


def test_commit_replaces_a_record_with_damaged_objects(store):
    old = produce(store, "k1", {"a": b"lost"})
    os.chmod(old.file("a"), 0o644)
    old.file("a").unlink()
    new = produce(store, "k1", {"a": b"fresh"})
    assert new.committed and store.get("k1").file("a").read_bytes() == b"fresh"


def test_commit_that_loses_the_create_only_write_returns_the_winner(store, monkeypatch):
    """Both writers passed the "is there a record?" check: the record's create-only write decides."""
    winner = produce(store, "k1", {"a": b"winner"})
    real = LocalStore._intact_record
    calls = []

    def first_call_misses(self, key):
        calls.append(key)
        return None if len(calls) == 1 else real(self, key)

    monkeypatch.setattr(LocalStore, "_intact_record", first_call_misses)
    loser = produce(store, "k1", {"a": b"loser"})
    assert len(calls) == 2 and not loser.committed and loser == winner
    assert store.get("k1").file("a").read_bytes() == b"winner"
    assert not list((store.root / "actions" / "k1").glob(".*.tmp"))  # no temp file left behind


COMMIT_RACE_CHILD = """
    import json, os, sys, time
    from caspec.store import LocalStore
    root, go = sys.argv[1:3]
    store = LocalStore(root)
    real, seen = store._intact_record, []

    def skip_first_check(key):  # every writer passes the "no record yet" check, as if all at one instant
        seen.append(key)
        return None if len(seen) == 1 else real(key)

    store._intact_record = skip_first_check
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    with store.staging("racekey") as d:  # no lock: two machines on a shared store
        (d / "out.txt").write_text(f"made by {os.getpid()}")
        rec = store.commit("racekey", d, kind="race", material={}, result={"pid": os.getpid()}, meta={})
    print(json.dumps({"committed": rec.committed, "pid": rec.result["pid"]}), flush=True)
"""


def test_racing_commits_of_one_key_have_one_winner(store, tmp_path):
    go = tmp_path / "go"
    procs = [spawn(COMMIT_RACE_CHILD, store.root, go) for _ in range(4)]
    for proc in procs:
        assert read_line(proc) == "ready"
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    winners = [r for r in results if r["committed"]]
    assert len(winners) == 1, results
    assert {r["pid"] for r in results} == {winners[0]["pid"]}  # every loser got the winner's record
    record = store.get("racekey")
    assert record.result == {"pid": winners[0]["pid"]} and store.verify(record) == []
    assert record.file("out.txt").read_text() == f"made by {winners[0]['pid']}"


def test_lock_timeout_and_try_lock(store):
    with store.lock("k1"):
        with pytest.raises(StoreError, match="k1"):
            with store.lock("k1", timeout=0.1):
                pass
        with store.try_lock("k1") as got:
            assert got is False
        with store.try_lock("k2") as got:
            assert got is True
    with store.try_lock("k1") as got:
        assert got is True


# ----------------------------------------------------------------- corruption


def test_verify_reports_modified_and_missing_objects(store):
    rec = produce(store, "k1", {"a.txt": b"aaaa", "b.txt": b"bbbb", "c.txt": b"cccc"})
    assert store.verify(rec) == []
    a = rec.file("a.txt")
    os.chmod(a, 0o644)
    a.write_bytes(b"AAAA")  # same size, new bytes
    rec.file("b.txt").unlink()
    assert store.verify(rec) == ["a.txt", "b.txt"]


def test_verify_cache_still_detects_modification(store, monkeypatch):
    monkeypatch.setattr(LocalStore, "settle_ns", 0)  # let fresh files be cached
    rec = produce(store, "k1", {"a.txt": b"aaaa"})
    calls = []
    real = local_mod.sha256_file
    monkeypatch.setattr(local_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    assert store.verify(rec) == [] and store.verify(rec) == []
    assert len(calls) == 1  # second verify was served from the cache
    time.sleep(0.05)  # past the file clock's granularity
    obj = rec.file("a.txt")
    os.chmod(obj, 0o644)
    obj.write_bytes(b"AAAA")
    assert store.verify(rec) == ["a.txt"]


def test_verify_does_not_cache_freshly_written_files(store):
    rec = produce(store, "k1", {"a.txt": b"aaaa"})
    assert store.verify(rec) == []
    obj = rec.file("a.txt")
    st = obj.stat()
    os.chmod(obj, 0o644)
    obj.write_bytes(b"AAAA")
    os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    assert store.verify(rec) == ["a.txt"]


# ----------------------------------------------------------------- gc


def test_gc_keeps_referenced_and_removes_the_rest(store):
    keep = produce(store, "keep1", {"a": b"shared", "b": b"only-keep"})
    produce(store, "gone1", {"a": b"shared", "c": b"only-gone-123"})
    record_size = (store.root / "actions" / "go" / "gone1.json").stat().st_size
    dry = store.gc(keep={"keep1"}, dry_run=True)
    assert dry.records == ["gone1"] and dry.objects == [sha256_bytes(b"only-gone-123")]
    assert dry.bytes_freed == record_size + len(b"only-gone-123")
    assert store.has("gone1") and len(all_files(store.root / "objects")) == 3  # dry run removed nothing
    real = store.gc(keep={"keep1"})
    assert (real.records, real.objects, real.bytes_freed) == (dry.records, dry.objects, dry.bytes_freed)
    assert not store.has("gone1") and store.verify(keep) == []
    assert_consistent(store)
    assert store.gc(keep={"keep1"}).bytes_freed == 0


def test_drop_leaves_objects_for_gc(store):
    rec = produce(store, "k1", {"a": b"aaa"})
    store.drop("k1")
    store.drop("k1")  # idempotent
    assert not store.has("k1") and rec.file("a").exists()
    assert store.gc(keep={"k1"}).objects == [rec.digest("a")]


def test_gc_spares_staging_dir_whose_lock_is_held(store):
    stale = store.root / "tmp" / f"k1.{dead_pid()}.abcdef"
    produce(store, "other", {"x": b"x"})
    stale.mkdir()
    (stale / "f").write_bytes(b"12345")
    with store.lock("k1"):
        assert store.gc(keep={"other"}).temp_dirs == []
        assert stale.is_dir()
    report = store.gc(keep={"other"})
    assert report.temp_dirs == [str(stale)] and report.bytes_freed == 5 and not stale.exists()


def test_gc_spares_staging_dirs_open_in_this_process(store):
    with store.staging("k1") as d:  # no lock taken
        (d / "f").write_text("in progress")
        assert store.gc(keep=set()).temp_dirs == []
        assert (d / "f").exists()


def test_gc_removes_read_only_leftovers(store):
    stale = store.root / "tmp" / f"k1.{dead_pid()}.zzz"
    store.gc(keep=set())  # creates the layout
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "f").write_text("x")
    os.chmod(stale / "sub", 0o500)
    assert store.gc(keep=set()).temp_dirs == [str(stale)]
    assert not stale.exists()


# ----------------------------------------------------------------- state, layout, version


def test_state_roundtrip(store):
    assert store.read_state("spec") == {}
    store.write_state("spec", {"steps": {"a": "k1"}, "n": 1})
    assert store.read_state("spec") == {"steps": {"a": "k1"}, "n": 1}
    store.write_state("spec", {"steps": {}})
    assert store.read_state("spec") == {"steps": {}}
    assert [p.name for p in (store.root / "state").iterdir()] == ["spec.json"]
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(StoreError):
            store.write_state(bad, {})


def test_read_only_operations_create_nothing(tmp_path):
    root = tmp_path / "nowhere" / ".caspec"
    store = open_store(root)
    assert not store.has("k1") and store.get("k1") is None
    assert list(store.records()) == [] and store.read_state("spec") == {}
    assert store.verify(Record("k1", "t", {}, {"a": {"digest": "0" * 64, "size": 1}}, {})) == ["a"]
    store.drop("k1")
    assert store.gc(keep=set(), dry_run=True).bytes_freed == 0
    assert store.gc(keep=set()).bytes_freed == 0
    assert not (tmp_path / "nowhere").exists()


def test_newer_store_version_is_refused(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "VERSION").write_text("2\n")
    store = LocalStore(root)
    with pytest.raises(StoreError, match="newer"):
        store.has("k1")
    with pytest.raises(StoreError, match="newer"):
        with store.staging("k1"):
            pass
