"""The store under races and faults (issue 25, items 9-12): a step reads the upstream content it was keyed for;
S3's 409 on a racing conditional write loses the race cleanly; backends without a create-only write are
refused (and the tests notice a check-then-write); cached remote objects are re-hashed when first read."""
from __future__ import annotations

import errno
import os
import textwrap
import warnings
from pathlib import Path

import pytest

from caspec.errors import StoreError
from caspec.store import LocalStore, open_store
from caspec.store.remote import RemoteStore, RepairedObjectWarning

from fakeops import fake_ops  # tests/ is on sys.path
from s3server import running_s3


@pytest.fixture
def s3(monkeypatch):
    yield from running_s3(monkeypatch)


def produce(store, key: str, files: dict[str, bytes], overwrite: bool = False):
    with store.staging(key) as d:
        for rel, data in files.items():
            (d / rel).write_bytes(data)
        return store.commit(key, d, kind="t", material={"k": key}, result={"n": len(files)}, overwrite=overwrite)


# ------------------------------------------------------------------ 9. the upstream content a step was keyed for


def test_a_step_refuses_upstream_content_other_than_its_key_says(tmp_path):
    from caspec.exec.runner import run
    from caspec.exec.step import StepJob, execute_job
    from caspec.plan.graph import make_plan
    from caspec.plan.keys import content_digest
    from caspec.spec.load import load_spec

    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent("""
        version: 1
        roots:
          r: {prompt: "alpha", candidates: 1}
        edits:
          e: {from: r, prompts: ["red"], candidates: 1}
        """))
    with fake_ops():
        loaded, store = load_spec(spec), LocalStore(tmp_path / ".caspec")
        assert run(loaded, store, until=("r",)).exit_code == 0
        plan = make_plan(loaded, store)
        root = store.get(plan.nodes["r"].key)
        edit = plan.nodes["e"]
        job = StepJob(node=edit, loaded=loaded, upstream_keys={"source": root.key}, model_identity=None,
                      compute=None, upstream_contents={"source": content_digest(root)})
        # meanwhile another process replaces the upstream record (a concurrent --force): other bytes
        produce(store, root.key, {"c000.png": b"other bytes"}, overwrite=True)
        result = execute_job(job, store)
    assert result.status == "error" and "changed after this step was keyed" in result.message
    assert store.get(edit.key) is None  # nothing committed under a key that promises other content


# ------------------------------------------------------------------ 10. S3's 409 on a racing conditional PUT


def test_a_409_on_the_conditional_write_adopts_the_winner(s3, tmp_path, monkeypatch):
    winner = RemoteStore(s3.url, cache=tmp_path / "a")
    loser = RemoteStore(s3.url, cache=tmp_path / "b")
    real = loser.fs.pipe_file
    calls = []

    def racing(path, data, mode="overwrite", **kw):
        if mode == "create" and "/actions/" in path and not calls:
            calls.append(path)
            produce(winner, "k1", {"x.txt": b"winner"})  # the other writer's record lands meanwhile
            raise OSError(errno.EBUSY, "An error occurred (ConditionalRequestConflict) when calling the "
                                       "PutObject operation: concurrent conditional write (409)")
        return real(path, data, mode=mode, **kw)

    monkeypatch.setattr(loser.fs, "pipe_file", racing)
    record = produce(loser, "k1", {"x.txt": b"loser"})
    assert calls and not record.committed and record.file("x.txt").read_bytes() == b"winner"
    assert winner.get("k1").outputs == record.outputs  # the loser did not overwrite the winner


# ------------------------------------------------------------------ 11. create-only writes, or refusal


def _pretend_absent(monkeypatch, fs):
    """Every existence check of ``fs`` says "absent", as a racer sees it before the other's write lands: only a
    write that the backend itself makes conditional still refuses to replace the record."""
    for name in ("exists", "isfile", "_exists", "_isfile"):
        if hasattr(fs, name):
            monkeypatch.setattr(fs, name, (lambda *a, **k: False))
    for name in ("info", "_info"):
        if hasattr(fs, name):
            def missing(*a, **k):
                raise FileNotFoundError(a[0] if a else "")
            monkeypatch.setattr(fs, name, missing)


@pytest.mark.parametrize("backend", ["s3", "file"])
def test_the_commit_point_is_a_real_create_only_write(backend, request, tmp_path, monkeypatch):
    if backend == "s3":
        url = request.getfixturevalue("s3").url
    else:
        url = f"file://{tmp_path / 'shared'}"
    store = open_store(url, cache=tmp_path / "a")
    first = produce(store, "k1", {"x.txt": b"first"})
    rival = open_store(url, cache=tmp_path / "b")
    _pretend_absent(monkeypatch, rival.fs)
    assert rival._write_record("k1", b'{"not": "the winner"}') is False
    assert open_store(url, cache=tmp_path / "c").get("k1").outputs == first.outputs


def test_backends_without_a_create_only_write_are_refused(tmp_path, monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainMemory(MemoryFileSystem):  # fsspec's generic create: an exists-check, then a write
        protocol = ("plainmem",)
        store: dict = {}
        pseudo_dirs = [""]

    fsspec.register_implementation("plainmem", PlainMemory, clobber=True)
    monkeypatch.delenv("CASPEC_ALLOW_UNSAFE_STORE", raising=False)
    with pytest.raises(StoreError, match="(?s)offers no create-only write.*CASPEC_ALLOW_UNSAFE_STORE"):
        open_store("plainmem://lib", cache=tmp_path / "c")
    monkeypatch.setenv("CASPEC_ALLOW_UNSAFE_STORE", "1")  # one writer at a time: the user's choice
    assert produce(open_store("plainmem://lib", cache=tmp_path / "c"), "k1", {"a": b"1"}).committed


# ------------------------------------------------------------------ 12. cached objects verified on read


def test_a_tampered_cached_object_is_replaced_and_reported(s3, tmp_path):
    store = RemoteStore(s3.url, cache=tmp_path / "cache")
    record = produce(store, "k1", {"x.txt": b"the real bytes"})
    cached = record.file("x.txt")
    os.chmod(cached, 0o644)
    cached.write_bytes(b"tampered bytes")  # same size: only the hash tells
    later = RemoteStore(s3.url, cache=tmp_path / "cache")  # a later process, same machine cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = later.get("k1").file("x.txt")
    assert path.read_bytes() == b"the real bytes"
    assert any(issubclass(w.category, RepairedObjectWarning) for w in caught)
    assert later.repaired == [record.digest("x.txt")]
    os.chmod(path, 0o644)
    path.write_bytes(b"tampered again")
    again = RemoteStore(s3.url, cache=tmp_path / "cache")
    with pytest.warns(RepairedObjectWarning):
        assert again.verify(again.get("k1")) == []  # verify repairs, and says so
    assert again.repaired == [record.digest("x.txt")] and Path(path).read_bytes() == b"the real bytes"
