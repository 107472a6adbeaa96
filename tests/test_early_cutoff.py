"""Keys follow content (issue 12, part 3): a step keys on the bytes its upstream steps actually produced.

Different bytes under the same upstream key re-run what reads them; identical bytes keep it cached,
even when the upstream ran again. The first record committed for a key wins, unless `--force`.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from caspec.exec.runner import run
from caspec.plan.graph import CACHED, RUN, make_plan
from caspec.plan.keys import KEY_VERSION, content_digest
from caspec.spec.load import load_spec
from caspec.store import LocalStore

from caspec.ops.base import image_entry

from fakeops import FakeRoot, NoisyRoot, fake_ops

SPEC = """
version: 1
name: t
roots:
  r: {prompt: "alpha", candidates: 2%s}
edits:
  e: {from: r, prompts: ["red"], candidates: 1}
"""
MODEL = {"k": 1}


def setup(tmp: Path, root_extra: str = ""):
    path = tmp / "t.yaml"
    path.write_text(textwrap.dedent(SPEC % root_extra))
    return load_spec(path), LocalStore(tmp / ".caspec")


def plan(loaded, store, force=()):
    return make_plan(loaded, store, model_identity=MODEL, force=set(force))


def go(loaded, store, force=(), reporter=None):
    return run(loaded, store, plan=plan(loaded, store, force), force=tuple(force), reporter=reporter)


def statuses(summary):
    return {sid: o.status for sid, o in summary.outcomes.items()}


class Warnings:
    """A reporter that keeps the warnings."""

    def __init__(self):
        self.warnings: list[str] = []

    def __getattr__(self, name):
        return lambda *a, **k: None

    def warn(self, message):
        self.warnings.append(message)


class StepsBlindRoot(FakeRoot):
    """A root whose key has `steps`, which does not change its bytes."""

    def params(self, step, spec):
        return {**super().params(step, spec), "steps": step.steps}


def test_key_version_and_content_in_the_key(tmp_path):
    with fake_ops():
        loaded, store = setup(tmp_path)
        go(loaded, store)
        p = plan(loaded, store)
    assert KEY_VERSION == 3
    r, e = p.nodes["r"], p.nodes["e"]
    assert e.material["key_version"] == 3
    assert e.material["upstream"] == {"source": content_digest(store.get(r.key))}  # content, not r's key
    assert r.key not in str(e.material)


def test_new_upstream_bytes_under_the_same_key_rerun_downstream(tmp_path):
    with fake_ops(root=NoisyRoot()):
        loaded, store = setup(tmp_path)
        first = go(loaded, store)
        assert statuses(first) == {"r": "ran", "e": "ran"}
        old_r, old_e = first.plan.nodes["r"].key, first.plan.nodes["e"].key
        old_bytes = store.get(old_r).file("c000.png").read_bytes()

        forced = go(loaded, store, force=("r",))
        assert statuses(forced) == {"r": "ran", "e": "ran"}  # e read old bytes: it must not stay cached
        assert forced.plan.nodes["r"].key == old_r  # same key, new bytes (--force replaced the record)
        new_bytes = store.get(old_r).file("c000.png").read_bytes()
        assert new_bytes != old_bytes
        new_e = forced.plan.nodes["e"].key
        assert new_e != old_e
        assert store.get(new_e).file("s0-p0-c0.png").read_bytes().startswith(new_bytes)
        out = tmp_path / "out" / "t" / "e" / "s0-p0-c0.png"
        assert out.read_bytes().startswith(new_bytes)

        again = plan(loaded, store)
        assert {n.status for n in again.order()} == {CACHED} and again.nodes["e"].key == new_e


def test_same_upstream_bytes_keep_downstream_cached(tmp_path):
    with fake_ops(root=StepsBlindRoot()):
        loaded, store = setup(tmp_path, ", steps: 10")
        first = go(loaded, store)
        e_key = first.plan.nodes["e"].key
        forced = go(loaded, store, force=("r",))
        assert statuses(forced) == {"r": "ran", "e": "cached"}
        assert forced.plan.nodes["e"].key == e_key
        # another root key that makes the same bytes: the root runs, the edit stays cached (early cutoff)
        loaded, _ = setup(tmp_path, ", steps: 20")
        p = plan(loaded, store)
        assert p.nodes["r"].status == RUN and p.nodes["r"].key != first.plan.nodes["r"].key
        assert p.nodes["e"].status == RUN and p.nodes["e"].provisional
        assert p.nodes["e"].reasons == ["after `r` runs (stays cached if its outputs are unchanged)"]
        changed = go(loaded, store)
        assert statuses(changed) == {"r": "ran", "e": "cached"}
        assert changed.plan.nodes["e"].key == e_key


def test_plan_downstream_of_a_step_that_runs(tmp_path):
    with fake_ops():
        loaded, store = setup(tmp_path)
        p = plan(loaded, store)
        r, e = p.nodes["r"], p.nodes["e"]
        assert not r.provisional and r.to_json()["provisional"] is False
        assert e.provisional and e.pending == ["r"] and e.short_key.startswith("~")
        assert e.status == RUN and e.reasons == ["never run", "after `r` runs"]
        assert e.to_json()["provisional"] is True and len(e.to_json()["key"]) == 64
        go(loaded, store)

        forced = plan(loaded, store, force=("r",))
        cached = plan(loaded, store)
        assert cached.nodes["e"].status == CACHED and not cached.nodes["e"].provisional
        f = forced.nodes["e"]
        assert forced.nodes["r"].status == RUN and f.status == RUN and f.provisional
        assert f.reasons == ["after `r` runs (stays cached if its outputs are unchanged)"]
        assert f.key == cached.nodes["e"].key  # the key it keeps if r's bytes come out the same


def test_plan_keeps_a_changed_own_param_visible_beside_a_running_upstream(tmp_path):
    with fake_ops():
        loaded, store = setup(tmp_path)
        go(loaded, store)
        spec = tmp_path / "t.yaml"
        spec.write_text(spec.read_text().replace('"alpha"', '"beta"').replace('["red"]', '["blue"]'))
        e = plan(load_spec(spec), store).nodes["e"]
    assert e.status == RUN and e.reasons == ["params.prompts ['red'] -> ['blue']", "after `r` runs"]


def test_first_record_wins_in_the_executor(tmp_path):
    """Another run (say, a machine sharing the store without a working lock) commits the key while this one
    runs the step: its record is kept and used downstream, with a warning naming the step."""

    class RacedRoot(FakeRoot):
        def run(self, ctx):
            rival = LocalStore(ctx.extra["checkpoint_dir"].parent.parent)  # the same store, another writer
            with rival.staging(ctx.key) as d:
                (d / "c000.png").write_bytes(b"rival#0")
                images = [image_entry("c000", "c000.png", prompt=ctx.params["prompt"], seed=0)]
                rival.commit(ctx.key, d, kind="root", material={}, result={"images": images}, meta={"by": "rival"})
            return super().run(ctx)

    with fake_ops(root=RacedRoot()):
        loaded, store = setup(tmp_path)
        rep = Warnings()
        s = go(loaded, store, reporter=rep)
    assert statuses(s) == {"r": "ran", "e": "ran"}
    r_key = s.plan.nodes["r"].key
    assert rep.warnings == [f"`r`: another run committed key {r_key[:12]} first; using its outputs"]
    assert store.get(r_key).meta == {"by": "rival"}
    assert (tmp_path / "out" / "t" / "r" / "c000.png").read_bytes() == b"rival#0"
    assert store.get(s.plan.nodes["e"].key).file("s0-p0-c0.png").read_bytes().startswith(b"rival#0")


def test_force_replaces_the_record(tmp_path):
    with fake_ops(root=NoisyRoot()):
        loaded, store = setup(tmp_path)
        first = go(loaded, store)
        key = first.plan.nodes["r"].key
        before = store.get(key)
        rep = Warnings()
        go(loaded, store, force=("r",), reporter=rep)
    after = store.get(key)
    assert after.outputs != before.outputs and rep.warnings == []
    assert store.verify(after) == []


def test_dry_run_after_forcing_upstream_would_run_downstream(tmp_path):
    with fake_ops():
        loaded, store = setup(tmp_path)
        go(loaded, store)
        s = run(loaded, store, plan=plan(loaded, store, ("r",)), force=("r",), dry_run=True)
    assert statuses(s) == {"r": "would-run", "e": "would-run"}
    assert "after `r` runs" in s.outcomes["e"].message
