"""Benchmark: running on several cores, a Ray cluster and an S3 store (not a test).

  pair      `caspec run specs/toy-demo.yaml` alone, then two at once (fresh stores): with caspec's CPU
            slots (default threads), with 1 thread each, and (--no-slots) with slots off, as before.
  library   a 4-concept library on `tiny` (root -> 2 SDEdits -> training, each), local executor against
            the Ray executor on a local Ray instance (this machine's cores), fresh stores, same run.
  overhead  1,000 trivial steps (a bench-only op that writes 16 bytes): local executor against Ray.
  s3        object throughput to a moto S3 server on 127.0.0.1: commit (upload) and fetch (download).

Usage: python bench/scale_out.py [pair library overhead s3] [--no-slots]   (markdown for BENCHMARKS.md)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # helpers shared with the tests (moto server, library spec)
CASPEC = [sys.executable, "-m", "caspec"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only


def _run(spec: Path, store: Path, env: dict[str, str] | None = None, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CASPEC, "run", str(spec), "--store", str(store), *extra],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_all(procs: list[subprocess.Popen], start: float) -> list[float]:
    ends = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"caspec run exited {p.returncode}:\n{err}")
        ends.append(time.perf_counter() - start)
    return ends


def _copy_spec(tmp: Path, name: str) -> Path:
    """toy-demo (and the root image it reads) in a folder of its own (two runs must not lay out outputs into
    one out/ folder)."""
    folder = tmp / name
    folder.mkdir(parents=True)
    shutil.copytree(ROOT / "specs" / "toy-concepts", folder / "toy-concepts")
    return Path(shutil.copy(ROOT / "specs" / "toy-demo.yaml", folder))


def pair(tmp: Path, no_slots: bool) -> None:
    rows = []
    start = time.perf_counter()
    alone = _wait_all([_run(_copy_spec(tmp, "alone"), tmp / "alone" / "store")], start)[0]
    rows.append(("one run alone (2 threads)", alone, 1.0))
    cases = [("two at once, CPU slots (2 threads each)", {}),
             ("two at once, 1 thread each", {"CASPEC_THREADS": "1"})]
    if no_slots:
        cases.append(("two at once, slots off (2 threads each: before)", {"CASPEC_CPU_SLOTS": "0"}))
    for name, env in cases:
        start = time.perf_counter()
        folders = [f"case{len(rows)}-{i}" for i in range(2)]
        ends = _wait_all([_run(_copy_spec(tmp, f), tmp / f / "store", env) for f in folders], start)
        rows.append((name, max(ends), max(ends) / alone))
    print("| toy-demo runs | wall s | vs one alone |\n|---|---:|---:|")
    for name, secs, ratio in rows:
        print(f"| {name} | {secs:.1f} | {ratio:.2f}x |")


def library(tmp: Path, n: int = 4) -> None:
    from library import library_spec  # tests/library.py: the spec the Ray tests use, heavier here

    spec = library_spec(tmp, n, steps=10, train_steps=30, strength=0.86)
    rows = []
    for name, extra, env in [("local executor (2 threads per step)", (), {}),
                             ("local executor (1 thread per step)", (), {"CASPEC_THREADS": "1"}),
                             ("Ray executor, local instance (1 thread per task)", ("--executor", "ray"), {})]:
        start = time.perf_counter()
        secs = _wait_all([_run(spec, tmp / f"store-{len(rows)}", env, *extra)], start)[0]
        rows.append((name, secs))
    ref = rows[0][1]
    print(f"| {n}-concept library on tiny ({3 * n} steps) | makespan s | vs local |\n|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} | {secs / ref:.2f}x |")


def overhead(tmp: Path, n: int = 1000) -> None:
    """Per-step cost of the executors themselves: ``n`` roots whose op writes 16 bytes."""
    import caspec.ops as ops
    from caspec.exec.local import LocalExecutor
    from caspec.exec.ray_backend import RayExecutor
    from caspec.exec.runner import run
    from caspec.spec.load import load_spec
    from caspec.store import LocalStore

    ops._cache["root"] = TrivialRoot()
    lines = ["version: 1", "name: trivial", "model: tiny", "roots:"]
    lines += [f'  r{i}: {{prompt: "p{i}", candidates: 1}}' for i in range(n)]
    (tmp / "trivial.yaml").write_text("\n".join(lines) + "\n")
    loaded = load_spec(tmp / "trivial.yaml")
    rows = []
    for name, executor in [("local", LocalExecutor()), ("Ray, local instance", RayExecutor())]:
        if name.startswith("Ray"):
            executor._connect()  # start-up is not per-step cost: measured apart
        start = time.perf_counter()
        summary = run(loaded, LocalStore(tmp / f"trivial-{name[:3]}"), executor=executor)
        secs = time.perf_counter() - start
        assert summary.exit_code == 0 and len(summary.by_status("ran")) == n
        rows.append((name, secs))
    print(f"| {n} trivial steps | wall s | per step ms |\n|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} | {1000 * secs / n:.1f} |")


class TrivialRoot:
    """A bench-only op (pickled by value into Ray workers, being defined in ``__main__``)."""

    KIND, VERSION, USES_MODEL, IS_GATE, TORCH_COMPUTE = "root", 1, False, False, False

    def params(self, step, spec):
        return {"prompt": step.prompt}

    def inputs(self, step, spec_dir):
        return {}

    def upstream(self, step):
        return {}

    def run(self, ctx):
        (ctx.out_dir / "x.bin").write_bytes(ctx.params["prompt"].encode().ljust(16, b"."))
        return {"images": []}


def s3(tmp: Path, count: int = 64, size: int = 1 << 20) -> None:
    import uuid

    from s3server import S3, free_port

    from caspec.store.remote import RemoteStore

    server = S3(free_port(), f"bench-{uuid.uuid4().hex[:8]}")
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    server.start()
    try:
        server.client().create_bucket(Bucket=server.bucket)
        store = RemoteStore(server.url, cache=tmp / "cache-up")
        start = time.perf_counter()
        keys = []
        for i in range(count // 8):  # 8 files per step
            key = f"{i:064x}"
            with store.staging(key) as d:
                for j in range(8):
                    (d / f"f{j}.bin").write_bytes(os.urandom(size))
                store.commit(key, d, kind="bench", material={}, result={}, meta={})
            keys.append(key)
        up = time.perf_counter() - start
        fresh = RemoteStore(server.url, cache=tmp / "cache-down")
        start = time.perf_counter()
        for key in keys:
            record = fresh.get(key)
            for rel in record.outputs:
                record.file(rel)
        down = time.perf_counter() - start
    finally:
        server.stop()
    mb = count * size / 1e6
    print(f"| moto S3 on 127.0.0.1, {count} objects of {size >> 20} MiB | s | MB/s | objects/s |\n|---|---:|---:|---:|")
    print(f"| commit (hash, upload, record) | {up:.2f} | {mb / up:.0f} | {count / up:.0f} |")
    print(f"| fetch into an empty cache (download, verify) | {down:.2f} | {mb / down:.0f} | {count / down:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", default=["pair", "library", "overhead", "s3"])
    ap.add_argument("--no-slots", action="store_true", help="pair: also two runs with CPU slots off (slow)")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}\n")
    tmp = Path(tempfile.mkdtemp(prefix="caspec-scale-"))
    try:
        for part in args.parts:
            start = time.perf_counter()
            {"pair": lambda: pair(tmp, args.no_slots), "library": lambda: library(tmp),
             "overhead": lambda: overhead(tmp), "s3": lambda: s3(tmp)}[part]()
            print(f"\n({part}: {time.perf_counter() - start:.0f} s)\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
