"""The Ray executor against a real local cluster (a head with 2 CPUs on 127.0.0.1, whose raylet runs the
tasks in separate worker processes) and a real S3 endpoint (moto's server on 127.0.0.1).

Drivers run as `caspec` subprocesses, as a user runs them, so that they can be killed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from library import library_spec  # noqa: E402  (tests/ is on sys.path)
from s3server import S3, free_port  # noqa: E402

from caspec.store import LocalStore
from caspec.store.remote import RemoteStore

pytestmark = pytest.mark.slow
CASPEC = [sys.executable, "-m", "caspec"]
RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds and advertises 127.0.0.1 only
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

def _wait_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, caspec_cache):
    """A moto S3 server and a Ray head (2 CPUs, no GPU) on 127.0.0.1, with the environment every driver
    and worker shares; both stopped after the module."""
    base = tmp_path_factory.mktemp("ray")
    s3 = S3(free_port(), f"caspec-{uuid.uuid4().hex[:12]}")
    s3.start()
    env = {**os.environ, **LOOPBACK, "HF_HUB_OFFLINE": "1", "CASPEC_CACHE": str(caspec_cache),
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2",
           "CASPEC_OBJECT_CACHE": str(base / "object-cache")}
    for name in ("CASPEC_STORE", "CASPEC_EXECUTOR", "CASPEC_THREADS", "CASPEC_RAY_ADDRESS", "AWS_PROFILE"):
        env.pop(name, None)
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in env if k.startswith(("AWS_", "RAY_")) or k == "CASPEC_OBJECT_CACHE"})
    import boto3

    boto3.client("s3").create_bucket(Bucket=s3.bucket)
    port = free_port()
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={base / 'ray'}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port)
        yield {"env": env, "address": f"127.0.0.1:{port}", "s3": s3, "base": base}
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # a throw-away cluster: no need for a graceful stop
        head.wait(30)
        _kill_leftovers(base / "ray")
        s3.stop()
        os.environ.clear()
        os.environ.update(saved)


def _kill_leftovers(temp_dir: Path) -> None:
    """Processes of this cluster that outlived its head (matched by its temp dir on their command line)."""
    out = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def caspec(cluster, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CASPEC, *args], env={**cluster["env"], **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def ray_args(cluster) -> list[str]:
    return ["--executor", "ray", "--ray-address", cluster["address"]]


def plan_keys(cluster, spec: Path, *args: str) -> dict[str, dict]:
    res = caspec(cluster, "plan", str(spec), "--json", *args)
    assert res.returncode == 0, res.stderr
    return {s["id"]: s for s in json.loads(res.stdout)}


def digests(store, keys: dict[str, str]) -> dict[str, dict]:
    return {sid: {rel: o["digest"] for rel, o in store.get(key).outputs.items()} for sid, key in keys.items()}


def ran_steps(stderr: str) -> list[str]:
    return [line.split()[1] for line in stderr.splitlines() if line.startswith("✓ ") and " ran " in line]


def test_four_concepts_same_keys_and_bytes_local_and_ray_local_and_s3_and_steps_overlap(cluster, tmp_path):
    spec = library_spec(tmp_path)
    one = {"CASPEC_THREADS": "1"}  # like with like: Ray's CPU tasks run 1 thread each by default
    local = caspec(cluster, "run", str(spec), "--store", str(tmp_path / "local"), env=one)
    assert local.returncode == 0, local.stderr
    s3_url = f"{cluster['s3'].url}/{tmp_path.name}"
    ray = caspec(cluster, "run", str(spec), "--store", s3_url, *ray_args(cluster))
    assert ray.returncode == 0, ray.stderr
    assert "done: 12 ran;" in ray.stderr and len(ran_steps(ray.stderr)) == 12, ray.stderr

    local_plan = plan_keys(cluster, spec, "--store", str(tmp_path / "local"), "--threads", "1")
    ray_plan = plan_keys(cluster, spec, "--store", s3_url, *ray_args(cluster))
    keys = {sid: s["key"] for sid, s in local_plan.items()}
    assert {sid: s["key"] for sid, s in ray_plan.items()} == keys
    assert all(s["status"] == "cached" for s in [*local_plan.values(), *ray_plan.values()])
    remote = RemoteStore(s3_url, cache=tmp_path / "check-cache")
    assert digests(remote, keys) == digests(LocalStore(tmp_path / "local"), keys)
    assert all(remote.verify(remote.get(k)) == [] for k in keys.values())

    # the same spec, Ray executor, local store: the same keys again
    ray_local = caspec(cluster, "run", str(spec), "--store", str(tmp_path / "ray-local"), *ray_args(cluster))
    assert ray_local.returncode == 0, ray_local.stderr
    assert digests(LocalStore(tmp_path / "ray-local"), keys) == digests(LocalStore(tmp_path / "local"), keys)

    # steps ran at the same time, in different worker processes (from the records' start and end times)
    spans = sorted((remote.get(k).meta["started"], remote.get(k).meta["finished"], remote.get(k).meta["pid"])
                   for k in keys.values())
    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    assert overlaps and any(a[2] != b[2] for a, b in overlaps), spans
    assert all(remote.get(k).meta["environment"]["torch_threads"] == 1
               for sid, k in keys.items() if sid.startswith(("r", "e", "c")))


def test_two_drivers_on_one_s3_store_run_each_op_once(cluster, tmp_path):
    spec = library_spec(tmp_path, n=2)
    url = f"{cluster['s3'].url}/{tmp_path.name}"
    cmd = [*CASPEC, "run", str(spec), "--store", url, *ray_args(cluster)]
    drivers = [subprocess.Popen(cmd, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = [d.communicate(timeout=300) for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [err for _, err in results]
    ran = [sid for _, err in results for sid in ran_steps(err)]
    assert sorted(ran) == sorted(set(ran)) and len(ran) == 6, [err for _, err in results]  # each op once in all
    store = RemoteStore(url, cache=tmp_path / "check")
    records = list(store.records())
    assert len(records) == 6 and all(store.verify(r) == [] for r in records)


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpoints(store_dir: Path) -> list[Path]:
    return list((store_dir / "checkpoints").glob("*/checkpoint.pt"))


def _task_pids(name: str) -> list[int]:
    """Ray worker processes now running the task named ``name`` (Ray titles them ``ray::<name>``)."""
    out = subprocess.run(["pgrep", "-f", f"ray::{name}"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def training_driver(cluster, spec: Path, store_dir: Path) -> subprocess.Popen:
    """A Ray driver of ``spec``, returned once a training step has written its first checkpoint."""
    driver = subprocess.Popen([*CASPEC, "run", str(spec), "--store", str(store_dir), *ray_args(cluster)],
                              env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _checkpoints(store_dir), 240, "a training checkpoint")
    return driver


def test_a_worker_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(cluster, tmp_path):
    spec = library_spec(tmp_path, n=1, train_steps=40, checkpoint_every=5)
    store_dir = tmp_path / "store"
    driver = training_driver(cluster, spec, store_dir)
    pids = _wait_for(lambda: _task_pids("caspec:c0"), 30, "the training task's worker")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    store = LocalStore(store_dir)
    records = list(store.records())
    assert len(records) == 3 and all(store.verify(r) == [] for r in records)
    train = next(r for r in records if r.kind == "train")
    assert train.meta["run"]["resumed_from"], train.meta  # the retry resumed from the checkpoint
    assert train.meta["pid"] not in pids


def test_a_killed_driver_loses_nothing_and_the_next_run_finishes(cluster, tmp_path):
    spec = library_spec(tmp_path, n=2, train_steps=40, checkpoint_every=5)
    store_dir = tmp_path / "store"
    driver = training_driver(cluster, spec, store_dir)
    driver.kill()
    driver.wait(30)
    store = LocalStore(store_dir)
    before = {r.key for r in store.records()}
    assert before and all(store.verify(r) == [] for r in store.records())
    again = caspec(cluster, "run", str(spec), "--store", str(store_dir), *ray_args(cluster))
    assert again.returncode == 0, again.stderr
    after = {r.key for r in store.records()}
    assert before <= after and len(after) == 6  # every step committed before the kill is still there...
    cached = [line.split()[1] for line in again.stderr.splitlines() if " cached " in line]
    assert len(cached) >= len(before), again.stderr  # ...and was reused, not re-run
    assert all(store.verify(r) == [] for r in store.records())


def test_ctrl_c_cancels_the_running_tasks_and_keeps_finished_steps(cluster, tmp_path):
    spec = library_spec(tmp_path, n=1, train_steps=200, checkpoint_every=5)
    store_dir = tmp_path / "store"
    driver = training_driver(cluster, spec, store_dir)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    assert "interrupted: finished steps are kept" in err and "Traceback" not in err
    _wait_for(lambda: not _task_pids("caspec:c0"), 30, "the training task to be cancelled")
    store = LocalStore(store_dir)
    kinds = sorted(r.kind for r in store.records())
    assert kinds == ["edit", "root"] and all(store.verify(r) == [] for r in store.records())


def test_a_review_gate_stops_only_its_branch_and_failures_keep_exit_codes(cluster, tmp_path):
    spec = tmp_path / "gated.yaml"
    spec.write_text(textwrap.dedent("""
        version: 1
        name: gated
        model: tiny
        defaults: {seed: 5, steps: 4, resolution: 32}
        roots:
          a: {prompt: "a photo of a robot", candidates: 1}
          b: {prompt: "a photo of a city", candidates: 1}
        edits:
          ea: {from: a, prompts: ["a red robot"], candidates: 2, strength: 0.5}
        select:
          picks: {from: ea, count: 1}
        concepts:
          ca: {from: picks, words: [{token: "<x1>", init: robot}], resolution: 32,
               train: {phase1_steps: 2, phase2_steps: 2}}
          bad: {from: b, words: [{token: "<y1>", init: city}], resolution: 32,
                train: {phase1_steps: 2, phase2_steps: 2, unet_targets: [no_such_module]}}
    """))
    res = caspec(cluster, "run", str(spec), "--store", str(tmp_path / "s"), *ray_args(cluster))
    assert res.returncode == 1, res.stderr  # a step failed in a worker (and a gate waits): 1, as locally
    assert "error: step `bad` failed" in res.stderr and "no_such_module" in res.stderr, res.stderr
    assert "review:" in res.stderr and "Traceback" not in res.stderr
    assert set(ran_steps(res.stderr)) == {"a", "b", "ea"}, res.stderr
    line = next(x for x in res.stderr.splitlines() if x.split()[1:2] == ["ca"])
    assert "blocked" in line, res.stderr  # only the gate's branch stopped
    only = caspec(cluster, "run", str(spec), "--store", str(tmp_path / "s"), "--only", "b", "--force", "b",
                  *ray_args(cluster))
    assert only.returncode == 0 and ran_steps(only.stderr) == ["b"], only.stderr
