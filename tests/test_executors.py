"""The executor interface without a cluster: compute in the keys, CPU slots, the walk with out-of-order
completions, Ray's resource mapping and the worker-side checks."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from caspec.cli import main
from caspec.errors import CaspecError, UsageError
from caspec.exec.compute import Compute
from caspec.exec.cpu_slots import cpu_slots
from caspec.exec.local import LocalExecutor
from caspec.exec.ray_backend import RayExecutor, parse_resources
from caspec.exec.runner import run
from caspec.exec.step import StepJob, check_here, execute_job
from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

from fakeops import fake_ops

SPEC = """
version: 1
name: t
roots:
  a: {prompt: "alpha", candidates: 1}
  b: {prompt: "beta", candidates: 1}
  c: {prompt: "crash", candidates: 1}
edits:
  ea: {from: a, prompts: ["red"], candidates: 1}
  eb: {from: b, prompts: ["red"], candidates: 1}
  ec: {from: c, prompts: ["red"], candidates: 1}
"""


def load(tmp: Path, text: str = SPEC):
    path = tmp / "t.yaml"
    path.write_text(textwrap.dedent(text))
    return load_spec(path)


# ----------------------------------------------------------------- compute in the keys


def test_cpu_keys_hold_the_thread_count_and_gpu_keys_do_not(tmp_path):
    with fake_ops():
        loaded = load(tmp_path)
        store = LocalStore(tmp_path / "s")
        one = make_plan(loaded, store, model_identity={"k": 1}, compute=Compute("cpu", 1))
        two = make_plan(loaded, store, model_identity={"k": 1}, compute=Compute("cpu", 2))
        gpu = make_plan(loaded, store, model_identity={"k": 1}, compute=Compute("cuda", 1))
        gpu8 = make_plan(loaded, store, model_identity={"k": 1}, compute=Compute("cuda", 8))
    assert one.nodes["a"].material["compute"] == {"device": "cpu", "threads": 1}
    assert one.nodes["a"].key != two.nodes["a"].key
    assert gpu.nodes["a"].material["compute"] == {"device": "cuda"}
    assert gpu.nodes["a"].key == gpu8.nodes["a"].key != one.nodes["a"].key
    per_kind = Compute("cpu", 1, {"edit": 3})
    assert per_kind.for_node(one.nodes["ea"]) == {"device": "cpu", "threads": 3}
    assert per_kind.for_node(one.nodes["a"]) == {"device": "cpu", "threads": 1}


def test_steps_without_torch_work_carry_no_compute(tmp_path):
    from caspec.ops import get_op

    assert not get_op("export").TORCH_COMPUTE and not get_op("select").TORCH_COMPUTE
    node = SimpleNamespace(op=get_op("export"), kind="export")
    assert Compute("cpu", 4).for_node(node) is None


def test_threads_option_and_env_change_the_plan_and_say_why(tmp_path, monkeypatch):
    spec = tmp_path / "t.yaml"
    spec.write_text("version: 1\nname: t\nmodel: tiny\nroots:\n  r: {prompt: a robot, candidates: 1, steps: 2, resolution: 32}\n")
    cli = CliRunner()
    res = cli.invoke(main, ["run", str(spec), "--threads", "1"])
    assert res.exit_code == 0, res.stderr
    assert cli.invoke(main, ["plan", str(spec), "--threads", "1"]).stdout.split("\n")[1].split()[3] == "cached"
    monkeypatch.setenv("CASPEC_THREADS", "3")
    res = cli.invoke(main, ["plan", str(spec)])
    assert "compute.threads 1 -> 3" in res.stdout, res.stdout
    monkeypatch.setenv("CASPEC_THREADS", "many")
    res = cli.invoke(main, ["plan", str(spec)])
    assert res.exit_code == 2 and "CASPEC_THREADS='many'" in res.stderr and "Traceback" not in res.stderr
    monkeypatch.delenv("CASPEC_THREADS")
    from caspec.store import LocalStore as LS

    record = next(iter(LS(tmp_path / ".caspec").records()))
    assert record.meta["environment"]["torch_threads"] == 1  # the op ran with the threads its key says


def test_ray_options_need_the_ray_executor():
    res = CliRunner().invoke(main, ["plan", "x.yaml", "--ray-address", "127.0.0.1:1"])
    assert res.exit_code == 2


# ----------------------------------------------------------------- CPU slots

HOLD = """
import sys, time
from caspec.exec.cpu_slots import cpu_slots
from caspec.exec.local import LocalExecutor
with cpu_slots(int(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(threads: int, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(threads), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_cpu_slots_serialize_steps_that_would_oversubscribe(monkeypatch):
    monkeypatch.setenv("CASPEC_CPU_SLOTS", "2")
    holder = _holder(2, 1.5)
    start = time.monotonic()
    waits: list[str] = []
    with cpu_slots(2, on_wait=waits.append, poll=0.05) as n:
        waited = time.monotonic() - start
    holder.wait()
    assert n == 2 and waited > 1.0 and waits and "waiting for 2 free CPU core(s)" in waits[0]


def test_cpu_slots_let_small_steps_share_and_cap_at_the_machine(monkeypatch):
    monkeypatch.setenv("CASPEC_CPU_SLOTS", "2")
    holder = _holder(1, 3)
    start = time.monotonic()
    with cpu_slots(1, poll=0.05):
        assert time.monotonic() - start < 1.0  # one core is still free
    holder.kill()  # SIGKILL frees the slot at once
    holder.wait()
    with cpu_slots(8, poll=0.05) as n:  # more threads than cores: takes the whole machine
        assert n == 2 and time.monotonic() - start < 2.5
    monkeypatch.setenv("CASPEC_CPU_SLOTS", "0")
    with cpu_slots(4) as n:
        assert n == 0


# ----------------------------------------------------------------- the walk


class ThreadedExecutor:
    """Runs jobs in threads and hands results back in reverse order of submission: a stand-in for a
    cluster, to check the walk does not depend on completions coming in plan order."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.results: list = []
        self.lock = threading.Lock()
        self.submitted: list[str] = []

    def compute(self, loaded):
        return Compute("cpu", 1)

    def start(self, store): ...

    def submit(self, job, store, reporter):
        self.submitted.append(job.node.id)

        def work():
            res = execute_job(job, store)
            with self.lock:
                self.results.append(res)

        t = threading.Thread(target=work)
        t.start()
        self.threads.append(t)

    def poll(self):
        return []

    def wait(self):
        for t in self.threads:
            t.join()
        self.threads.clear()
        with self.lock:
            out, self.results = self.results[::-1], []
        return out

    def stop(self): ...


def test_the_walk_submits_all_ready_steps_and_keeps_exit_codes(tmp_path):
    with fake_ops():
        loaded = load(tmp_path)
        store = LocalStore(tmp_path / "s")
        executor = ThreadedExecutor()
        summary = run(loaded, store, executor=executor)
        assert set(executor.submitted[:3]) == {"a", "b", "c"}  # the three roots at once
        status = {sid: o.status for sid, o in summary.outcomes.items()}
        assert status == {"a": "ran", "b": "ran", "c": "failed", "ea": "ran", "eb": "ran", "ec": "blocked"}
        assert summary.exit_code == 1
        assert "boom" in summary.outcomes["c"].message
        local = run(loaded, LocalStore(tmp_path / "s2"), executor=LocalExecutor(threads=1))
        assert {n.id: n.key for n in local.plan.order()} == {n.id: n.key for n in summary.plan.order()}
        again = run(loaded, store, executor=ThreadedExecutor())
        assert {sid: o.status for sid, o in again.outcomes.items() if sid != "c" and sid != "ec"} == {
            "a": "cached", "b": "cached", "ea": "cached", "eb": "cached"}


# ----------------------------------------------------------------- Ray's resources and worker checks


def test_parse_resources():
    assert parse_resources(["train=cpus:2,gpus:1", "edit=gpus:0.5"]) == {
        "train": {"cpus": 2.0, "gpus": 1.0}, "edit": {"gpus": 0.5}}
    for bad in ("train", "train=", "train=cpus", "train=cpus:x", "train=mem:3", "train=cpus:-1"):
        with pytest.raises(UsageError, match="expected KIND=cpus:N"):
            parse_resources([bad])


def _job(kind: str, compute, gate=False):
    op = SimpleNamespace(IS_GATE=gate, USES_MODEL=True, TORCH_COMPUTE=compute is not None)
    node = SimpleNamespace(id=f"{kind}-step", kind=kind, op=op, key="k" * 64)
    return StepJob(node=node, loaded=None, upstream_keys={}, model_identity=None, compute=compute)


def test_ray_resources_by_step_kind():
    ex = RayExecutor("127.0.0.1:1", resources={"train": {"cpus": 4}})
    assert ex.options(_job("edit", {"device": "cuda"}))["num_gpus"] == 1.0
    cpu = ex.options(_job("edit", {"device": "cpu", "threads": 2}))
    assert cpu["num_cpus"] == 2.0 and cpu["num_gpus"] == 0.0
    assert ex.options(_job("export", None))["num_cpus"] == 0.25
    assert ex.options(_job("train", {"device": "cpu", "threads": 4}))["num_cpus"] == 4
    assert ex.options(_job("train", {"device": "cpu", "threads": 4}))["max_retries"] == 3


def test_ray_keys_follow_the_allotment_and_the_cluster_s_gpus():
    ex = RayExecutor("127.0.0.1:1", resources={"train": {"cpus": 2.5}})
    ex._ray, ex._gpus = object(), 0.0  # connected to a cluster without GPUs
    loaded = SimpleNamespace(spec=SimpleNamespace(model=SimpleNamespace(device="auto")))
    c = ex.compute(loaded)
    assert (c.device, c.default_threads, c.threads_for("train")) == ("cpu", 1, 3)
    ex2 = RayExecutor("127.0.0.1:1")
    ex2._ray, ex2._gpus = object(), 8.0
    assert ex2.compute(loaded).device == "cuda"


def test_a_worker_refuses_other_weights_or_another_device(tmp_path):
    loaded = load(tmp_path, "version: 1\nname: t\nmodel: tiny\nroots:\n  r: {prompt: a, candidates: 1}\n")
    from caspec.models.load import model_identity

    here = model_identity(loaded.spec.model, loaded.dir)
    with fake_ops():
        plan = make_plan(loaded, LocalStore(tmp_path / "s"), compute=Compute("cpu", 1))
    node = plan.nodes["r"]
    ok = StepJob(node=node, loaded=loaded, upstream_keys={}, model_identity=here, compute={"device": "cpu", "threads": 1})
    check_here(ok)
    other = dict(here, recipe="something-else") if "recipe" in here else dict(here, kind="local", files={"x": "1"})
    with pytest.raises(CaspecError, match="other weights than on the driver"):
        check_here(StepJob(node=node, loaded=loaded, upstream_keys={}, model_identity=other, compute=None))
    with pytest.raises(CaspecError, match="keyed for device cuda"):
        check_here(StepJob(node=node, loaded=loaded, upstream_keys={}, model_identity=here, compute={"device": "cuda"}))


def test_gc_and_assets_keep_and_find_what_a_run_with_other_threads_built(tmp_path):
    """A Ray run keys CPU steps for 1 thread each; `gc` and `assets` (planning with this machine's
    threads) must still keep and find its entries: they also plan with the last run's compute."""
    spec = tmp_path / "t.yaml"
    spec.write_text(textwrap.dedent("""
        version: 1
        name: t
        roots:
          a: {prompt: "alpha", candidates: 1}
        edits:
          ea: {from: a, prompts: ["red"], candidates: 1}
    """))
    cli = CliRunner()
    with fake_ops():
        assert cli.invoke(main, ["run", str(spec), "--threads", "1"]).exit_code == 0
        res = cli.invoke(main, ["gc", str(spec), "--dry-run"])
        assert res.exit_code == 0 and "would remove 0 step(s)" in res.stdout, res.stdout
        spec.write_text(spec.read_text().replace('"alpha"', '"beta"'))
        assert cli.invoke(main, ["run", str(spec), "--threads", "1"]).exit_code == 0
        res = cli.invoke(main, ["gc", str(spec)])
    assert res.exit_code == 0 and "removed 2 step(s)" in res.stdout, res.stdout  # the old a and ea only


@pytest.mark.slow
def test_assets_list_finds_an_asset_built_with_other_threads(tmp_path):
    from library import library_spec

    spec = library_spec(tmp_path, n=1, train_steps=2)
    cli = CliRunner()
    res = cli.invoke(main, ["run", str(spec), "--threads", "1"])
    assert res.exit_code == 0, res.stderr
    res = cli.invoke(main, ["assets", "list", str(spec)])
    assert res.exit_code == 0 and res.stdout.startswith("c0\t<a0>"), res.stdout + res.stderr
