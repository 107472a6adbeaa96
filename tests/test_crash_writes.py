"""Crash at every write (issue 25, item 13), as SQLite's crash tests do: a small spec's run is killed
(``os._exit``, like kill -9) right after its N-th store write, for every N, on the local store and on S3. After
each crash: no corrupt entry, every step committed before the crash still there; the next run then finishes
with exactly the bytes of an uninterrupted run, re-running nothing that had finished."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caspec.store import open_store
from caspec.store.faults import ENV, EXIT_CODE

from s3server import running_s3

pytestmark = pytest.mark.slow

SPEC = """version: 1
name: c
roots:
  r1: {image: a.png}
  r2: {image: b.png}
select:
  s: {from: r1, manifest: reviews/c/s.yaml}
"""
MANIFEST = "spec: c\nstep: s\nsource: r1\ncandidates:\n  - {id: c000, keep: true}\n"


def _project(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (40, 40, 200)).save(folder / "b.png")
    (folder / "reviews" / "c").mkdir(parents=True)
    (folder / "reviews" / "c" / "s.yaml").write_text(MANIFEST)
    (folder / "c.yaml").write_text(SPEC)
    return folder / "c.yaml"


def _run(spec: Path, store: str, env: dict[str, str], crash_after: int | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1"}
    full.pop(ENV, None)
    if crash_after is not None:
        full[ENV] = str(crash_after)
    return subprocess.run([sys.executable, "-m", "caspec", "run", str(spec), "--store", store], env=full,
                          capture_output=True, text=True, timeout=300)


def _state(spec: Path, store_url: str, env: dict[str, str]) -> dict[str, object]:
    """Every record's outputs and result (none corrupt), and the bytes under out/."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = open_store(store_url, cache=spec.parent / "object-cache") if "://" in store_url else open_store(store_url)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a corrupt record would warn
            records = {r.key: (r.outputs, r.result) for r in store.records()}
            for key in records:
                assert store.verify(store.get(key)) == [], f"corrupt entry {key}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = spec.parent / "out"
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} \
        if out.is_dir() else {}
    return {"records": records, "out": files}


def _crash_at_every_write(tmp_path: Path, store_for: callable, env: dict[str, str]) -> int:
    reference_spec = _project(tmp_path / "reference")
    ref_store = store_for(tmp_path / "reference")
    assert _run(reference_spec, ref_store, env).returncode == 0
    reference = _state(reference_spec, ref_store, env)
    crashes = 0
    for n in range(1, 200):
        spec = _project(tmp_path / f"crash-{n}")
        store = store_for(tmp_path / f"crash-{n}")
        crashed = _run(spec, store, env, crash_after=n)
        if crashed.returncode == 0:
            break  # fewer than n writes: every write has been crashed after
        assert crashed.returncode == EXIT_CODE, crashed.stderr
        crashes += 1
        after_crash = _state(spec, store, env)  # no corrupt entry (would raise)
        finished = set(after_crash["records"])
        rerun = _run(spec, store, env)
        assert rerun.returncode == 0, rerun.stderr
        for line in rerun.stderr.splitlines():  # nothing that had finished runs again
            parts = line.split()
            if len(parts) > 4 and parts[1] in ("r1", "r2", "s") and parts[4][:12] in {k[:12] for k in finished}:
                assert parts[3] == "cached", line
        final = _state(spec, store, env)
        assert final == reference, f"after a crash at write {n}, the run did not give the same bytes"
        assert set(final["records"]) >= finished  # no finished step lost
        shutil.rmtree(spec.parent)
    assert crashes >= 5  # the spec's run makes at least: VERSION, 2 objects, 3 records, state
    return crashes


def test_crash_after_every_local_store_write(tmp_path):
    crashes = _crash_at_every_write(tmp_path, lambda folder: str(folder / ".caspec"), {})
    assert crashes >= 7


@pytest.fixture
def s3(monkeypatch):
    yield from running_s3(monkeypatch)


def test_crash_after_every_s3_store_write(tmp_path, s3):
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    prefixes = iter(range(10_000))

    def store_for(folder: Path) -> str:  # each project its own prefix in the one bucket, its own object cache
        return f"s3://{s3.bucket}/{folder.name}-{next(prefixes)}"

    stores: dict[str, str] = {}

    def cached_store_for(folder: Path) -> str:
        if folder.name not in stores:
            stores[folder.name] = store_for(folder)
        return stores[folder.name]

    env["CASPEC_OBJECT_CACHE"] = str(tmp_path / "object-cache")
    crashes = _crash_at_every_write(tmp_path, cached_store_for, env)
    assert crashes >= 7
