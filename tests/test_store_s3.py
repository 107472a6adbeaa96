"""The store on S3-compatible object storage (caspec.store.remote) against a real S3 server on loopback
(moto's server mode): same keys and bytes as a local store, create-only records (first writer wins),
verification on read, the read-through cache, leases, and a clear error when the server goes away."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec.cli import main
from caspec.errors import StoreError
from caspec.store import LocalStore, open_store
from caspec.store.hashing import sha256_bytes
from caspec.store.remote import RemoteStore

from s3server import free_port, running_s3  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]

SPEC = """
version: 1
name: cloudy
model: tiny
defaults: {seed: 7, steps: 4, resolution: 32}
roots:
  robot: {prompt: "a photo of a robot", candidates: 1}
edits:
  colors: {from: robot, prompts: ["a photo of a red robot"], candidates: 1, strength: 0.5}
"""


@pytest.fixture
def s3(monkeypatch, tmp_path):
    yield from running_s3(monkeypatch, object_cache=tmp_path / "object-cache")


def produce(store, key: str, files: dict[str, bytes], overwrite: bool = False):
    with store.staging(key) as d:
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return store.commit(key, d, kind="test", material={"files": sorted(files)}, result={"n": len(files)},
                            meta={}, overwrite=overwrite)


def cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def plan_json(spec: Path, *store: str) -> dict[str, dict]:
    code, out, err = cli("plan", str(spec), "--json", *store)
    assert code == 0, err
    return {s["id"]: s for s in json.loads(out)}


def outputs_of(store, keys: dict[str, str]) -> dict[str, dict]:
    return {sid: {rel: o["digest"] for rel, o in store.get(key).outputs.items()} for sid, key in keys.items()}


# ----------------------------------------------------------------- the store itself


def test_open_store_dispatches_and_local_stays_free_of_fsspec(tmp_path, s3):
    assert isinstance(open_store(s3.url), RemoteStore)
    assert isinstance(open_store(tmp_path / "local"), LocalStore)
    code = ("import sys; from caspec.store import open_store; open_store(sys.argv[1]); "
            "print(sorted(m for m in ('fsspec', 's3fs', 'botocore', 'caspec.store.remote') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "local")], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "[]"


def test_first_record_wins_and_overwrite_replaces(s3, tmp_path):
    store = RemoteStore(s3.url, cache=tmp_path / "a")
    assert store.atomic_create  # s3fs sends PutObject with If-None-Match: *
    first = produce(store, "k1", {"x.txt": b"first"})
    assert first.committed
    rival = RemoteStore(s3.url, cache=tmp_path / "b")  # another machine, its own cache
    second = produce(rival, "k1", {"x.txt": b"second"})
    assert not second.committed and (second.key, second.outputs) == (first.key, first.outputs)
    assert second.file("x.txt").read_bytes() == b"first"  # the winner's bytes, in the loser's cache
    assert str(second.file("x.txt")).startswith(str(tmp_path / "b"))
    # the conditional write itself refuses to replace an existing record (the race, decided by the server)
    assert rival._write_record("k1", b"{}") is False
    assert store.get("k1").outputs == first.outputs
    forced = produce(rival, "k1", {"x.txt": b"second"}, overwrite=True)
    assert forced.committed and store.get("k1").digest("x.txt") == sha256_bytes(b"second")
    assert "store/VERSION" in s3.keys() and "store/actions/k1/k1.json" in s3.keys()


def test_corrupt_record_reads_as_absent_and_records_drop_state(s3, tmp_path):
    store = RemoteStore(s3.url, cache=tmp_path / "a")
    produce(store, "good", {"a": b"1"})
    s3.client().put_object(Bucket=s3.bucket, Key="store/actions/ba/bad.json", Body=b"{not json")
    with pytest.warns(UserWarning, match="corrupt action record"):
        assert store.get("bad") is None
    with pytest.warns(UserWarning):
        assert [r.key for r in store.records()] == ["good"]
    store.write_state("spec", {"steps": {"a": {"key": "good"}}})
    assert store.read_state("spec") == {"steps": {"a": {"key": "good"}}} and store.state_names() == ["spec"]
    store.drop("good")
    assert not store.has("good") and store.read_state("other") == {}


def test_corrupt_object_in_the_bucket_is_reported_by_verify(s3, tmp_path):
    store = RemoteStore(s3.url, cache=tmp_path / "a")
    record = produce(store, "k1", {"a.bin": b"A" * 100, "b.bin": b"B" * 100})
    digest = record.digest("a.bin")
    s3.client().put_object(Bucket=s3.bucket, Key=f"store/objects/{digest[:2]}/{digest}", Body=b"Z" * 100)
    assert store.verify(record) == []  # this machine fetched nothing: its cache holds the good copy
    fresh = RemoteStore(s3.url, cache=tmp_path / "fresh")
    assert fresh.verify(fresh.get("k1")) == ["a.bin"]
    assert not (tmp_path / "fresh" / "objects" / digest[:2] / digest).exists()  # nothing bad is cached
    # re-running the step heals the bucket: the known-bad object is uploaded again
    fresh.drop("k1")
    produce(fresh, "k1", {"a.bin": b"A" * 100, "b.bin": b"B" * 100})
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"store/objects/{digest[:2]}/{digest}")["Body"].read()
    assert body == b"A" * 100
    assert RemoteStore(s3.url, cache=tmp_path / "third").verify(fresh.get("k1")) == []


def test_gc_keeps_what_is_kept_and_young_objects_then_removes_old_unreferenced_ones(s3, tmp_path, monkeypatch):
    store = RemoteStore(s3.url, cache=tmp_path / "a", gc_grace_seconds=3600)
    kept = produce(store, "k1", {"a": b"kept"})
    gone = produce(store, "k2", {"b": b"unreferenced"})
    report = store.gc({"k1"})
    assert report.records == ["k2"] and report.objects == []  # b's object is inside the grace period
    assert not store.has("k2") and store.has("k1")
    b_key = f"store/objects/{gone.digest('b')[:2]}/{gone.digest('b')}"
    assert b_key in s3.keys()
    old = RemoteStore(s3.url, cache=tmp_path / "a", gc_grace_seconds=0)  # everything is past the grace period
    assert old.gc({"k1"}, dry_run=True).objects == [gone.digest("b")] and b_key in s3.keys()
    assert old.gc({"k1"}).objects == [gone.digest("b")]
    assert b_key not in s3.keys() and RemoteStore(s3.url, cache=tmp_path / "fresh").verify(kept) == []
    # a commit reusing an object older than half the grace period uploads it again (fresh timestamp for gc)
    uploads: list[str] = []
    real_put = store.fs.put_file
    monkeypatch.setattr(store.fs, "put_file", lambda lpath, rpath, **kw: (uploads.append(rpath), real_put(lpath, rpath, **kw)))
    produce(store, "k3", {"a": b"kept"})
    assert uploads == []  # young: reused
    store.gc_grace_seconds = 0
    produce(store, "k4", {"a": b"kept"})
    assert len(uploads) == 1


def test_gc_leaves_the_shared_cache_s_checkpoints_alone(s3, tmp_path):
    """The object cache is shared by every remote store of a machine: a checkpoint there may belong to a
    step of another store that is running now, so `caspec gc` on this store must not remove it."""
    from caspec.store.report import collect_garbage

    store = RemoteStore(s3.url, cache=tmp_path / "shared")
    produce(store, "k1", {"a": b"x"})
    other = tmp_path / "shared" / "checkpoints" / "another-stores-running-key"
    other.mkdir(parents=True)
    (other / "checkpoint.pt").write_bytes(b"state")
    collect_garbage(store, [], dry_run=False)
    assert (other / "checkpoint.pt").read_bytes() == b"state"
    assert not store.has("k1")  # gc did run: no spec keeps k1


def test_read_through_cache_fetches_each_object_once(s3, tmp_path, monkeypatch):
    writer = RemoteStore(s3.url, cache=tmp_path / "writer")
    produce(writer, "k1", {"a": b"alpha", "sub/b": b"beta"})
    downloads: list[str] = []
    reader = RemoteStore(s3.url, cache=tmp_path / "reader")
    real_get = reader.fs.get_file
    monkeypatch.setattr(reader.fs, "get_file", lambda rpath, lpath, **kw: (downloads.append(rpath), real_get(rpath, lpath, **kw)))
    record = reader.get("k1")
    assert reader.verify(record) == [] and len(downloads) == 2
    cached = record.file("sub/b")
    assert cached.read_bytes() == b"beta" and str(cached).startswith(str(tmp_path / "reader"))
    before = os.stat(cached)
    assert reader.verify(reader.get("k1")) == [] and len(downloads) == 2  # nothing downloaded again
    again = RemoteStore(s3.url, cache=tmp_path / "reader")  # a new process on the same machine
    monkeypatch.setattr(again.fs, "get_file", lambda *a, **kw: pytest.fail("downloaded a cached object"))
    assert again.verify(again.get("k1")) == []
    after = os.stat(cached)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_record_file_is_a_local_path_fetched_on_first_use(s3, tmp_path):
    produce(RemoteStore(s3.url, cache=tmp_path / "writer"), "k1", {"card.yaml": b"name: x\n"})
    record = RemoteStore(s3.url, cache=tmp_path / "reader").get("k1")  # no verify: nothing fetched yet
    path = record.file("card.yaml")
    assert str(path).startswith(str(tmp_path / "reader")) and path.read_bytes() == b"name: x\n"


def test_lease_blocks_a_second_holder_and_is_taken_over_once_expired(s3, tmp_path):
    store = RemoteStore(s3.url, cache=tmp_path / "a", lease_seconds=60)
    other = RemoteStore(s3.url, cache=tmp_path / "b", lease_seconds=60)
    with store.lock("k1"):
        assert "store/leases/k1.json" in s3.keys()
        with pytest.raises(StoreError, match="waiting for the lease"):
            with other.lock("k1", timeout=0):
                pass
    assert "store/leases/k1.json" not in s3.keys()  # released at exit
    stale = json.dumps({"owner": "dead", "host": "elsewhere", "pid": 1, "expires": 1.0})
    s3.client().put_object(Bucket=s3.bucket, Key="store/leases/k1.json", Body=stale.encode())
    with other.lock("k1", timeout=0):  # expired: taken over at once
        held = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="store/leases/k1.json")["Body"].read())
        assert held["owner"] != "dead" and held["pid"] == os.getpid()


def test_lease_is_renewed_while_held_and_a_dead_holder_is_taken_over(s3, tmp_path):
    import time

    store = RemoteStore(s3.url, cache=tmp_path / "a", lease_seconds=1.5)
    other = RemoteStore(s3.url, cache=tmp_path / "b", lease_seconds=1.5)
    read = lambda: json.loads(s3.client().get_object(Bucket=s3.bucket, Key="store/leases/k1.json")["Body"].read())
    with store.lock("k1"):
        first = read()["expires"]
        time.sleep(3.2)  # over twice the lease: only renewal keeps it
        assert read()["expires"] > first
        with pytest.raises(StoreError, match="waiting for the lease"):
            with other.lock("k1", timeout=0):
                pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = {"owner": "crashed", "host": socket.gethostname(), "pid": int(dead.stdout), "expires": time.time() + 3600}
    s3.client().put_object(Bucket=s3.bucket, Key="store/leases/k1.json", Body=json.dumps(crashed).encode())
    with other.lock("k1", timeout=0):  # its holder died on this host: no need to wait for the expiry
        assert read()["owner"] != "crashed"


def test_generic_fsspec_backends_use_the_same_code(tmp_path):
    for url in (f"file://{tmp_path / 'files'}", f"memory://caspec-{uuid.uuid4().hex[:8]}"):
        store = open_store(url, cache=tmp_path / "cache")
        assert store.atomic_create  # memory: within one process; file://: caspec links a temp file create-only
        first = produce(store, "k1", {"a": b"1"})
        assert first.committed and not produce(store, "k1", {"a": b"2"}).committed
        assert store.verify(store.get("k1")) == [] and [r.key for r in store.records()] == ["k1"]
    assert (tmp_path / "files" / "actions" / "k1" / "k1.json").is_file()


def test_unreachable_endpoint_is_one_clear_error(tmp_path, monkeypatch, s3):
    spec = tmp_path / "cloudy.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, out, err = cli("plan", str(spec), "--store", s3.url)
    assert code == 1
    assert f"error: store {s3.url}: " in err and "Traceback" not in err + out


def test_a_missing_bucket_is_a_clear_error_on_the_first_write(s3, tmp_path):
    store = RemoteStore(f"s3://{s3.bucket}-missing/store", cache=tmp_path / "a")
    assert store.get("k1") is None  # reading finds nothing...
    with pytest.raises(StoreError, match=f"store s3://{s3.bucket}-missing/store: writing VERSION failed"):
        produce(store, "k1", {"a": b"1"})  # ...writing says so


def test_planning_against_s3_imports_no_torch(tmp_path, s3):
    spec = tmp_path / "cloudy.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    code = ("import sys, json; from click.testing import CliRunner; from caspec.cli import main; "
            f"r = CliRunner().invoke(main, ['plan', {str(spec)!r}, '--json', '--store', {s3.url!r}]); "
            "print(json.dumps({'code': r.exit_code, 'out': r.output, 'torch': 'torch' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["code"] == 0, res
    assert res["torch"] is False
    assert [s["id"] for s in json.loads(res["out"])] == ["robot", "colors"]


# ----------------------------------------------------------------- end to end on the tiny model


@pytest.mark.slow
def test_tiny_spec_on_s3_gives_the_local_keys_and_bytes(tmp_path, s3, monkeypatch):
    spec = tmp_path / "cloudy.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    code, _, err = cli("run", str(spec))
    assert code == 0, err
    local_keys = {sid: s["key"] for sid, s in plan_json(spec).items()}
    local = outputs_of(LocalStore(tmp_path / ".caspec"), local_keys)

    code, _, err = cli("run", str(spec), "--store", s3.url)
    assert code == 0, err
    assert "done: 2 ran;" in err
    remote_plan = plan_json(spec, "--store", s3.url)
    assert {sid: s["key"] for sid, s in remote_plan.items()} == local_keys
    assert all(s["status"] == "cached" for s in remote_plan.values())
    assert outputs_of(RemoteStore(s3.url), local_keys) == local
    assert any(k.startswith("store/objects/") for k in s3.keys())

    monkeypatch.setenv("CASPEC_STORE", s3.url)
    code, _, err = cli("run", str(spec))  # second run (store from CASPEC_STORE): fully cached
    assert code == 0 and "done: 2 cached;" in err, err
    monkeypatch.delenv("CASPEC_STORE")
    code, out, _ = cli("status", "--store", s3.url)
    assert code == 0 and s3.url in out and "spec cloudy: 2/2 steps" in out, out
    code, out, err = cli("gc", str(spec), "--store", s3.url, "--dry-run")
    assert code == 0 and "would remove 0 step(s), 0 object(s)" in out, out + err

    # an object damaged in the bucket (seen from a machine with an empty cache): verified, re-run, healed
    robot = RemoteStore(s3.url).get(local_keys["robot"])
    rel = sorted(robot.outputs)[0]
    digest = robot.digest(rel)
    s3.client().put_object(Bucket=s3.bucket, Key=f"store/objects/{digest[:2]}/{digest}", Body=b"damaged")
    monkeypatch.setenv("CASPEC_OBJECT_CACHE", str(tmp_path / "fresh-cache"))
    assert rel in RemoteStore(s3.url).verify(robot)
    code, _, err = cli("run", str(spec), "--store", s3.url)
    assert code == 0, err
    assert "corrupted" in err and "done: 1 ran, 1 cached;" in err  # the root re-ran; its edit stayed cached (same bytes)
    assert RemoteStore(s3.url, cache=tmp_path / "third").verify(robot) == []


@pytest.mark.slow
def test_server_stopped_mid_run_fails_cleanly_then_the_run_completes(tmp_path, s3, monkeypatch):
    spec = tmp_path / "cloudy.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    real_write = RemoteStore._write_record
    stopped: list[str] = []

    def stop_before_the_record(self, key, data, *, replace=False):
        if not stopped:  # the first step's objects are uploaded; the server dies before its record
            stopped.append(key)
            s3.stop()
        return real_write(self, key, data, replace=replace)

    monkeypatch.setattr(RemoteStore, "_write_record", stop_before_the_record)
    code, out, err = cli("run", str(spec), "--store", s3.url)
    assert code == 1, err
    assert f"store {s3.url}" in err and "Traceback" not in err + out
    s3.start()
    keys = s3.keys()
    assert any(k.startswith("store/objects/") for k in keys)  # its objects went up first...
    assert not any(k.startswith("store/actions/") for k in keys)  # ...and no record was half-written
    monkeypatch.setattr(RemoteStore, "_write_record", real_write)
    code, _, err = cli("run", str(spec), "--store", s3.url)
    assert code == 0 and "done: 2 ran;" in err, err
    store = RemoteStore(s3.url, cache=tmp_path / "check")
    records = list(store.records())
    assert len(records) == 2 and all(store.verify(r) == [] for r in records)
