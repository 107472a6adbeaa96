"""The executor on fast fake ops: caching, review gates, failures, interrupts, selection flags, concurrency."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from caspec.exec.runner import run
from caspec.errors import UsageError
from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

from fakeops import fake_ops

SPEC = """
version: 1
name: t
roots:
  a: {prompt: "alpha", candidates: 2}
  b: {prompt: "%s", candidates: 1}
edits:
  ea: {from: a, prompts: ["red", "blue"], candidates: 1}
  eb: {from: b, prompts: ["green"], candidates: 1}
select:
  pick: {from: ea, count: 2}
"""


@pytest.fixture(autouse=True)
def _fakes():
    with fake_ops():
        yield


def setup(tmp: Path, b_prompt: str = "beta"):
    path = tmp / "t.yaml"
    path.write_text(textwrap.dedent(SPEC % b_prompt))
    return load_spec(path), LocalStore(tmp / ".caspec")


def go(loaded, store, **kw):
    return run(loaded, store, plan=make_plan(loaded, store, model_identity={"k": 1}, force=set(kw.get("force", ()))), **kw)


def statuses(summary):
    return {sid: o.status for sid, o in summary.outcomes.items()}


def test_review_gate_pauses_one_branch_and_resumes(tmp_path):
    loaded, store = setup(tmp_path)
    s1 = go(loaded, store)
    assert statuses(s1) == {"a": "ran", "b": "ran", "ea": "ran", "eb": "ran", "pick": "awaiting-review"}
    assert s1.exit_code == 3
    manifest = tmp_path / "reviews" / "t" / "pick.yaml"
    data = yaml.safe_load(manifest.read_text())
    assert [c["id"] for c in data["candidates"]] == ["s0-p0-c0", "s0-p1-c0", "s1-p0-c0", "s1-p1-c0"]
    assert all(c["keep"] is False for c in data["candidates"])
    assert (tmp_path / "reviews" / "t" / "pick.html").exists()
    assert (tmp_path / data["candidates"][0]["image"].replace("../../", "")).exists()
    # one kept, count 2 -> still waiting, with a clear message
    text = manifest.read_text().replace("keep: false", "keep: true", 1)
    manifest.write_text(text)
    s2 = go(loaded, store)
    assert s2.exit_code == 3 and "needs exactly 2" in s2.outcomes["pick"].message
    manifest.write_text(text.replace("keep: false", "keep: true", 1))
    s3 = go(loaded, store)
    assert statuses(s3) == {"a": "cached", "b": "cached", "ea": "cached", "eb": "cached", "pick": "ran"}
    assert s3.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out" / "t" / "pick").glob("*.png")) == ["s0-p0-c0.png", "s0-p1-c0.png"]
    s4 = go(loaded, store)
    assert set(statuses(s4).values()) == {"cached"}


def test_stale_manifest_is_an_error_listing_candidates(tmp_path):
    loaded, store = setup(tmp_path)
    go(loaded, store)
    manifest = tmp_path / "reviews" / "t" / "pick.yaml"
    manifest.write_text(manifest.read_text().replace("keep: false", "keep: true", 2))
    spec = tmp_path / "t.yaml"
    spec.write_text(spec.read_text().replace('prompts: ["red", "blue"]', 'prompts: ["red", "white"]'))
    loaded = load_spec(spec)
    s = go(loaded, store)
    assert s.outcomes["pick"].status == "failed" and s.exit_code == 1
    msg = s.outcomes["pick"].message
    assert "no longer produces" in msg and "s0-p1-c0" in msg and "s1-p1-c0" in msg and "s0-p0-c0" not in msg
    assert "--reset" in s.outcomes["pick"].hint


def test_failure_stops_only_its_branch_and_leaves_nothing(tmp_path):
    loaded, store = setup(tmp_path, "crash")
    s = go(loaded, store)
    assert s.outcomes["b"].status == "failed" and "RuntimeError: boom" in s.outcomes["b"].message
    assert s.outcomes["eb"].status == "blocked"
    assert s.outcomes["ea"].status == "ran"
    assert s.exit_code == 1
    assert not store.has(s.plan.nodes["b"].key)
    assert list((store.root / "tmp").iterdir()) == []
    assert "traceback" in s.outcomes["b"].hint and Path(s.outcomes["b"].hint.split("`")[1]).exists()


def test_interrupt_keeps_finished_steps_and_no_partial_entry(tmp_path):
    loaded, store = setup(tmp_path, "interrupt")
    plan = make_plan(loaded, store, model_identity={"k": 1})
    with pytest.raises(KeyboardInterrupt):
        run(loaded, store, plan=plan)
    assert store.has(plan.nodes["a"].key)          # finished before the interrupt: kept
    assert not store.has(plan.nodes["b"].key)      # interrupted: nothing that looks complete
    assert list((store.root / "tmp").iterdir()) == []
    assert store.read_state("t")["steps"]["a"]["key"] == plan.nodes["a"].key


def test_only_until_force(tmp_path, monkeypatch):
    loaded, store = setup(tmp_path)
    log = tmp_path / "log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    with pytest.raises(UsageError) as err:
        go(loaded, store, only=("eb",))
    assert "--until eb" in err.value.hint
    s = go(loaded, store, until=("eb",))
    assert set(s.outcomes) == {"b", "eb"}
    s = go(loaded, store, only=("eb",))
    assert statuses(s) == {"eb": "cached"}
    s = go(loaded, store, only=("b",), force=("b",))
    assert statuses(s) == {"b": "ran"}
    assert log.read_text().splitlines() == ["run b", "run b"]
    with pytest.raises(UsageError) as err:
        go(loaded, store, only=("ebb",))
    assert "did you mean `eb`" in err.value.hint


def test_dry_run_writes_nothing(tmp_path):
    loaded, store = setup(tmp_path)
    s = go(loaded, store, dry_run=True)
    assert statuses(s) == {"a": "would-run", "b": "would-run", "ea": "would-run", "eb": "would-run",
                           "pick": "awaiting-review"}
    assert not (tmp_path / ".caspec").exists() and not (tmp_path / "out").exists()


def test_corrupted_entry_is_rerun_with_warning(tmp_path):
    loaded, store = setup(tmp_path)
    go(loaded, store)
    record = store.get(make_plan(loaded, store, model_identity={"k": 1}).nodes["a"].key)
    obj = record.file("c000.png")
    os.chmod(obj, 0o644)
    obj.write_bytes(b"tampered")

    warnings = []

    class Rep:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def warn(self, msg):
            warnings.append(msg)

    s = run(loaded, LocalStore(tmp_path / ".caspec"), plan=make_plan(loaded, store, model_identity={"k": 1}),
            reporter=Rep())
    assert s.outcomes["a"].status == "ran"
    assert warnings and "corrupted" in warnings[0] and "c000.png" in warnings[0]
    assert store.get(record.key).file("c000.png").read_bytes() == b"alpha#0"


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from fakeops import fake_ops
from caspec.exec.runner import run
from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore
with fake_ops():
    loaded = load_spec({spec!r})
    store = LocalStore({store!r})
    s = run(loaded, store, plan=make_plan(loaded, store, model_identity={{"k": 1}}), until=("ea",))
    print(sorted((k, o.status) for k, o in s.outcomes.items()))
"""


def test_concurrent_runs_run_each_step_once(tmp_path):
    loaded, store = setup(tmp_path)
    log = tmp_path / "log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_SLEEP": "0.5"}
    code = WORKER.format(tests=str(Path(__file__).parent), spec=str(loaded.path), store=str(store.root))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert log.read_text().splitlines() == ["run a"]  # the second run found it cached after the lock
    for k in ("a", "ea"):
        assert store.verify(store.get(make_plan(loaded, store, model_identity={"k": 1}).nodes[k].key)) == []


def test_prefilled_manifest_by_id_runs_without_pausing_and_keys_settle(tmp_path):
    loaded, store = setup(tmp_path)
    manifest = tmp_path / "reviews" / "t" / "pick.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("candidates:\n  - {id: s0-p0-c0, keep: true}\n  - {id: s1-p1-c0, keep: true}\n")
    plan = make_plan(loaded, store, model_identity={"k": 1})
    assert plan.nodes["pick"].status == "run" and plan.nodes["pick"].gate.provisional
    s = go(loaded, store)
    assert s.exit_code == 0 and s.outcomes["pick"].status == "ran"
    data = yaml.safe_load(manifest.read_text())
    assert {c["id"]: len(c["digest"]) for c in data["candidates"] if c["keep"]} == {"s0-p0-c0": 64, "s1-p1-c0": 64}
    assert len(data["candidates"]) == 4  # the others were appended, unreviewed
    replan = make_plan(loaded, store, model_identity={"k": 1})
    assert {n.status for n in replan.order()} == {"cached"}  # the digests written in give the same key
    assert sorted(p.name for p in (tmp_path / "out" / "t" / "pick").glob("*.png")) == ["s0-p0-c0.png", "s1-p1-c0.png"]


def test_prefilled_manifest_with_unknown_id_is_stale(tmp_path):
    loaded, store = setup(tmp_path)
    manifest = tmp_path / "reviews" / "t" / "pick.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("candidates:\n  - {id: s0-p0-c0, keep: true}\n  - {id: s9-p9-c9, keep: true}\n")
    s = go(loaded, store)
    assert s.outcomes["pick"].status == "failed"
    assert "s9-p9-c9 (no such id)" in s.outcomes["pick"].message
