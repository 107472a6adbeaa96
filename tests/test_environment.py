"""Records say what made them (libraries, device, torch threads), and `caspec plan` says when that differs
from now (issue 12, part 5): information only, a cached step stays cached."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from caspec.environment import LIBRARIES, describe, differences, predicted_torch_threads
from caspec.exec.runner import run
from caspec.plan.graph import CACHED, make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

from fakeops import fake_ops

TESTS = Path(__file__).resolve().parent
SPEC = """
version: 1
name: t
roots:
  r: {prompt: "alpha", candidates: 1}
edits:
  e: {from: r, prompts: ["red"], candidates: 1}
"""


@pytest.fixture(autouse=True)
def _fakes():
    with fake_ops():
        yield


def setup(tmp: Path):
    path = tmp / "t.yaml"
    path.write_text(textwrap.dedent(SPEC))
    loaded, store = load_spec(path), LocalStore(tmp / ".caspec")
    run(loaded, store, plan=make_plan(loaded, store))
    return loaded, store


def rewrite_environment(store: LocalStore, key: str, **changes) -> None:
    """Edit a record's environment in place, as if another machine had made it."""
    path = store.root / "actions" / key[:2] / f"{key}.json"
    body = json.loads(path.read_text())
    env = body["meta"]["environment"]
    for name, value in changes.items():
        if name in LIBRARIES:
            env["libraries"][name] = value
        else:
            env[name] = value
    path.write_text(json.dumps(body))


def test_every_record_names_its_environment(tmp_path):
    loaded, store = setup(tmp_path)
    plan = make_plan(loaded, store)
    for sid in ("r", "e"):
        env = store.get(plan.nodes[sid].key).meta["environment"]
        assert set(env["libraries"]) == {"torch", "diffusers", "transformers", "peft", "open_clip", "pillow",
                                         "safetensors", "caspec"}
        assert env["libraries"]["torch"] == importlib.metadata.version("torch")
        assert env["libraries"]["open_clip"] == importlib.metadata.version("open_clip_torch")
        assert env["device"] == "cpu"  # the resolved device of the spec's model (auto, no GPU here)
        assert isinstance(env["torch_threads"], int) and env["torch_threads"] >= 1


def test_plan_marks_cached_steps_made_elsewhere(tmp_path):
    loaded, store = setup(tmp_path)
    plan = make_plan(loaded, store, environment_notes=True)
    now_threads = store.get(plan.nodes["r"].key).meta["environment"]["torch_threads"]
    assert all(not n.notes for n in plan.order())
    rewrite_environment(store, plan.nodes["r"].key, torch="2.13.0", torch_threads=now_threads + 5)
    rewrite_environment(store, plan.nodes["e"].key, device="cuda", torch_threads=now_threads + 5)
    torch_now = importlib.metadata.version("torch")

    assert all(not n.notes for n in make_plan(loaded, store).order())  # notes only when asked for (plan, status)
    again = make_plan(loaded, store, environment_notes=True)
    r, e = again.nodes["r"], again.nodes["e"]
    assert r.status == e.status == CACHED  # information, not a re-run
    assert r.notes == [f"made with torch 2.13.0 (now {torch_now}), {now_threads + 5} threads (now {now_threads})"]
    assert e.notes == ["made with device cuda (now cpu)"]  # threads do not decide bytes on a GPU
    assert r.to_json()["environment_changes"] == {"torch": {"made": "2.13.0", "now": torch_now},
                                                  "torch_threads": {"made": now_threads + 5, "now": now_threads}}


def test_plan_notes_without_importing_torch(tmp_path):
    """`caspec plan` on cached records made elsewhere: notes in the table and in --json, and still no torch."""
    loaded, store = setup(tmp_path)
    key = make_plan(loaded, store).nodes["r"].key
    rewrite_environment(store, key, diffusers="0.1.0")
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        from click.testing import CliRunner
        from fakeops import fake_ops
        from caspec.cli import main
        with fake_ops():
            table = CliRunner().invoke(main, ["plan", {str(loaded.path)!r}])
            js = CliRunner().invoke(main, ["plan", {str(loaded.path)!r}, "--json"])
        print(json.dumps({{"table": table.output, "json": js.output, "torch": "torch" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["torch"] is False
    row = next(line for line in res["table"].splitlines() if line.startswith("r "))
    assert "cached" in row and "made with diffusers 0.1.0 (now " in row
    steps = {s["id"]: s for s in json.loads(res["json"])}
    assert steps["r"]["status"] == "cached" and steps["r"]["notes"][0].startswith("made with diffusers 0.1.0")
    assert steps["e"]["notes"] == [] and steps["e"]["environment_changes"] == {}


def test_differences_ignore_what_a_record_does_not_say():
    now = {"libraries": {"torch": "2.14.1", "peft": "0.21.2"}, "device": "cpu", "torch_threads": 2}
    assert differences({"libraries": {"torch": "2.14.1"}, "device": None, "torch_threads": 1}, now) == {}
    diff = differences({"libraries": {"peft": "0.20.0"}, "device": "cpu", "torch_threads": 1}, now)
    assert describe(diff) == "made with peft 0.20.0 (now 0.21.2), 1 thread (now 2)"


@pytest.mark.parametrize("threads", [None, "1"], ids=["default", "OMP_NUM_THREADS=1"])
def test_predicted_thread_count_is_torchs(threads):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    code = ("from caspec.environment import predicted_torch_threads as p, torch_threads as t\n"
            "guess = p(); import torch\nprint(guess, t(), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    guess, asked, actual = map(int, out.stdout.split())
    assert guess == asked == actual
    if threads:
        assert actual == 1
    assert predicted_torch_threads() >= 1
