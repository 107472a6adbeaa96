"""`select` with `by: clip`: the pure decision on fixed similarities, cache keys at plan level, the
executor on fast fake image ops with the tiny CLIP, and one real run on the tiny diffusion model."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fakeops import fake_ops
from caspec.exec.runner import run
from caspec.ops.base import Op, image_entry
from caspec.ops.select_clip import SCORE_FORMULA, Settings, decide, score_of
from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

# ---------------------------------------------------------------------------------------------
# the pure decision


def test_score_formula():
    assert score_of(0.3, 0.8) == pytest.approx(1.1)
    assert score_of(0.3, None) == pytest.approx(0.3)  # roots: text only
    assert "text + identity" in SCORE_FORMULA


def test_thresholds_each_apply_and_say_why():
    text = [0.30, 0.10, 0.30, 0.30, 0.25]
    ident = [0.90, 0.90, 0.50, 0.99, None]  # the last has no source: identity thresholds skip it
    d = decide(text, ident, None, Settings(min_text=0.2, min_identity=0.6, max_identity=0.95), ids="abcde")
    assert d.passed == [True, False, False, False, True]
    assert "text 0.100 < min_text 0.2" in d.why[1]
    assert "identity 0.500 < min_identity 0.6" in d.why[2]
    assert "identity 0.990 > max_identity 0.95" in d.why[3]
    assert d.kept == [0, 4]  # best score first
    assert d.problem == ""


def test_ranking_and_top_k():
    text = [0.1, 0.2, 0.3, 0.4]
    ident = [0.5, 0.5, 0.5, 0.5]
    d = decide(text, ident, None, Settings(top_k=2))
    assert d.kept == [3, 2]
    assert d.scores[3] == pytest.approx(0.9)
    assert "beyond top_k 2" in d.why[1]
    # ties go to the earlier candidate
    assert decide([0.2, 0.2, 0.2], [None] * 3, None, Settings(top_k=1)).kept == [0]


def test_near_duplicates_drop_the_lower_ranked():
    text = [0.4, 0.3, 0.2]
    dup = [[1.0, 0.99, 0.1], [0.99, 1.0, 0.2], [0.1, 0.2, 1.0]]
    d = decide(text, [None] * 3, dup, Settings(max_duplicate=0.95), ids=["x", "y", "z"])
    assert d.kept == [0, 2]
    assert "near-duplicate of x (0.990 > max_duplicate 0.95)" in d.why[1]
    # a dropped duplicate does not take a top_k slot
    assert decide(text, [None] * 3, dup, Settings(max_duplicate=0.95, top_k=2)).kept == [0, 2]
    # without max_duplicate nothing is dropped
    assert decide(text, [None] * 3, dup, Settings()).kept == [0, 1, 2]


def test_count_keeps_exactly_the_best_n():
    text = [0.1, 0.4, 0.3, 0.2]
    d = decide(text, [None] * 4, None, Settings(count=2, top_k=3))
    assert d.kept == [1, 2] and d.problem == ""
    assert "beyond count 2" in d.why[3]


def test_too_few_fails_listing_best_scores():
    text = [0.10, 0.35, 0.20]
    ident = [0.9, 0.4, 0.7]
    d = decide(text, ident, None, Settings(min_text=0.3, min_identity=0.8, min_keep=2), ids=["a", "b", "c"])
    assert d.kept == []
    assert "only 0 of 3 candidate(s) kept, the step needs at least 2" in d.problem
    # best first, with scores and what each failed
    assert d.problem.index("a: score 1.000") < d.problem.index("c: score 0.900") < d.problem.index("b: score 0.750")
    assert "text 0.100 < min_text 0.3" in d.problem and "identity 0.400 < min_identity 0.8" in d.problem
    d = decide([0.5, 0.1], [None, None], None, Settings(min_text=0.3, count=2))
    assert "needs exactly 2" in d.problem
    d = decide([0.5, 0.4, 0.3], [None] * 3, None, Settings(count=3, top_k=2))
    assert "`top_k: 2` keeps fewer than the 3" in d.problem


# ---------------------------------------------------------------------------------------------
# fast fake image ops (real PNGs, no diffusion model) + the tiny CLIP


class PngRoot(Op):
    KIND, VERSION, USES_MODEL = "root", 1, False

    def params(self, step, spec):
        return {"prompt": step.prompt, "candidates": step.candidates}

    def run(self, ctx):
        images = []
        for k in range(ctx.params["candidates"]):
            name = f"c{k:03d}.png"
            Image.new("RGB", (32, 32), (40 * k, 120, 200)).save(ctx.out_dir / name)
            images.append(image_entry(f"c{k:03d}", name, prompt=ctx.params["prompt"], seed=k))
        return {"images": images}


class PngEdit(Op):
    """Like EditOp: writes `sources/s<i>.png` and names it in `source_file`."""

    KIND, VERSION, USES_MODEL = "edit", 1, False

    def params(self, step, spec):
        return {"prompts": step.prompts, "candidates": step.candidates}

    def upstream(self, step):
        return {"source": step.from_}

    def run(self, ctx):
        images = []
        (ctx.out_dir / "sources").mkdir()
        for s, src in enumerate(ctx.upstream["source"].result["images"]):
            base = Image.open(ctx.upstream["source"].file(src["file"])).convert("RGB")
            base.save(ctx.out_dir / f"sources/s{s}.png")
            for p, prompt in enumerate(ctx.params["prompts"]):
                for k in range(ctx.params["candidates"]):
                    name = f"s{s}-p{p}-c{k}.png"
                    img = base.copy()
                    img.paste((255 * (p % 2), 60 * k, 30 * p), (0, 0, 8 + 8 * k, 8 + 4 * p))
                    img.save(ctx.out_dir / name)
                    images.append(image_entry(name[:-4], name, prompt=prompt, seed=k, source=src["id"],
                                              source_index=s, source_file=f"sources/s{s}.png"))
        return {"images": images}


@pytest.fixture()
def png_ops():
    with fake_ops(PngRoot(), PngEdit()):
        yield


SPEC = """
version: 1
name: t
roots:
  r: {prompt: "a robot", candidates: 1}
edits:
  e: {from: r, prompts: ["a red robot", "a blue robot"], candidates: 2}
select:
  pick:
    from: e
    by: clip
    clip: %s
"""
CLIP = "{model: caspec-tiny-clip, top_k: 2}"


def write(tmp: Path, clip: str = CLIP):
    path = tmp / "t.yaml"
    path.write_text(textwrap.dedent(SPEC % clip))
    return load_spec(path), LocalStore(tmp / ".caspec")


def plan(loaded, store):
    return make_plan(loaded, store, model_identity={"k": 1})


def go(loaded, store):
    return run(loaded, store, plan=plan(loaded, store))


def statuses(summary):
    return {sid: o.status for sid, o in summary.outcomes.items()}


def test_key_changes_with_thresholds_and_checkpoint_only(tmp_path):
    loaded, store = write(tmp_path)
    base = plan(loaded, store).nodes["pick"].key
    assert plan(*write(tmp_path)).nodes["pick"].key == base  # re-planning keeps it
    # the spec's description is not part of the key
    (tmp_path / "t.yaml").write_text((tmp_path / "t.yaml").read_text().replace("name: t", "name: t\ndescription: x"))
    assert plan(load_spec(tmp_path / "t.yaml"), store).nodes["pick"].key == base
    keys = {base}
    for clip in ("{model: caspec-tiny-clip, top_k: 3}", "{model: caspec-tiny-clip, top_k: 2, min_text: 0.1}",
                 "{model: caspec-tiny-clip, top_k: 2, min_identity: 0.5}",
                 "{model: caspec-tiny-clip, top_k: 2, max_duplicate: 0.99}",
                 "{model: caspec-tiny-clip, top_k: 2, min_keep: 2}"):
        keys.add(plan(*write(tmp_path, clip)).nodes["pick"].key)
    assert len(keys) == 6
    # the checkpoint file: its content, not its name or time
    ck = tmp_path / "clip.pt"
    ck.write_bytes(b"weights-1")
    with_ck = "{model: caspec-tiny-clip, top_k: 2, checkpoint: clip.pt}"
    k1 = plan(*write(tmp_path, with_ck)).nodes["pick"].key
    assert k1 not in keys
    assert plan(*write(tmp_path, with_ck)).nodes["pick"].key == k1
    ck.write_bytes(b"weights-2")
    k2 = plan(*write(tmp_path, with_ck)).nodes["pick"].key
    assert k2 != k1
    ck.write_bytes(b"weights-1")
    assert plan(*write(tmp_path, with_ck)).nodes["pick"].key == k1


def test_clip_selects_writes_scores_and_honours_a_hand_override(tmp_path, png_ops):
    loaded, store = write(tmp_path)
    s1 = go(loaded, store)
    assert statuses(s1) == {"r": "ran", "e": "ran", "pick": "ran"}, s1.outcomes["pick"].message
    manifest = tmp_path / "reviews" / "t" / "pick.yaml"
    data = yaml.safe_load(manifest.read_text())
    cands = data["candidates"]
    assert len(cands) == 4 and sum(c["keep"] for c in cands) == 2
    auto = sorted(c["digest"] for c in cands if c["keep"])
    assert data["auto"]["keep"] == auto and data["auto"]["by"] == "clip"
    for c in cands:
        sc = c["scores"]
        assert set(sc) == {"text", "identity", "score", "passed", "why"}
        assert sc["score"] == pytest.approx(sc["text"] + sc["identity"], abs=2e-4)
    kept_ids = sorted(c["id"] for c in cands if c["keep"])
    best = sorted(cands, key=lambda c: -c["scores"]["score"])[:2]
    assert kept_ids == sorted(c["id"] for c in best)
    out = tmp_path / "out" / "t" / "pick"
    assert sorted(p.stem for p in out.glob("*.png")) == kept_ids
    assert (tmp_path / "reviews" / "t" / "pick.html").read_text().count("kept (rank") == 2
    record = store.get(plan(loaded, store).nodes["pick"].key)
    assert all("scores" in img and "source_file" not in img for img in record.result["images"])
    assert record.result["decision"]["by"] == "clip"

    # unedited: fully cached, same key, manifest untouched
    key = plan(loaded, store).nodes["pick"].key
    before = manifest.read_text()
    assert set(statuses(go(loaded, store)).values()) == {"cached"}
    assert plan(loaded, store).nodes["pick"].key == key and manifest.read_text() == before

    # a hand edit: keep the worst one instead -> new key, re-run, the person's choice is kept
    worst = min(cands, key=lambda c: c["scores"]["score"])
    for c in data["candidates"]:
        c["keep"] = c["id"] == worst["id"]
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    key2 = plan(loaded, store).nodes["pick"].key
    assert key2 != key
    s2 = go(loaded, store)
    assert statuses(s2)["pick"] == "ran", s2.outcomes["pick"].message
    assert [p.stem for p in out.glob("*.png")] == [worst["id"]]
    after = yaml.safe_load(manifest.read_text())
    assert after["auto"]["keep"] == auto  # the automatic decision is still recorded
    assert [c["id"] for c in after["candidates"] if c["keep"]] == [worst["id"]]
    assert all("scores" in c for c in after["candidates"])
    assert store.get(key2).result["decision"]["by"] == "hand"
    assert set(statuses(go(loaded, store)).values()) == {"cached"}
    assert plan(loaded, store).nodes["pick"].key == key2

    # going back to the automatic decision gives the first key back (still in the store)
    for c in after["candidates"]:
        c["keep"] = c["digest"] in auto
    manifest.write_text(yaml.safe_dump(after, sort_keys=False))
    assert plan(loaded, store).nodes["pick"].key == key
    assert statuses(go(loaded, store))["pick"] == "cached"


def test_stale_override_is_an_error(tmp_path, png_ops):
    loaded, store = write(tmp_path)
    go(loaded, store)
    manifest = tmp_path / "reviews" / "t" / "pick.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["candidates"][0]["keep"] = not data["candidates"][0]["keep"]
    data["candidates"][0]["digest"] = "0" * 64
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    s = go(loaded, store)
    assert s.outcomes["pick"].status == "failed"
    assert "no longer produces" in s.outcomes["pick"].message and data["candidates"][0]["id"] in s.outcomes["pick"].message


def test_too_few_pass_fails_with_scores_and_still_writes_the_manifest(tmp_path, png_ops):
    loaded, store = write(tmp_path, "{model: caspec-tiny-clip, min_text: 0.99, min_keep: 1}")
    s = go(loaded, store)
    o = s.outcomes["pick"]
    assert o.status == "failed" and s.exit_code != 0
    assert "only 0 of 4 candidate(s) kept" in o.message and "Best scores: s0-" in o.message
    assert "< min_text 0.99" in o.message and "min_text" in o.hint
    data = yaml.safe_load((tmp_path / "reviews" / "t" / "pick.yaml").read_text())
    assert not any(c["keep"] for c in data["candidates"]) and data["auto"]["keep"] == []
    assert all(c["scores"]["passed"] is False for c in data["candidates"])


def test_roots_have_no_identity(tmp_path, png_ops):
    path = tmp_path / "t.yaml"
    path.write_text(textwrap.dedent("""
        version: 1
        name: t
        roots:
          r: {prompt: "a robot", candidates: 3}
        select:
          pick: {from: r, by: clip, count: 2, clip: {model: caspec-tiny-clip, min_identity: 0.99}}
    """))
    loaded, store = load_spec(path), LocalStore(tmp_path / ".caspec")
    s = go(loaded, store)
    assert statuses(s)["pick"] == "ran", s.outcomes["pick"].message
    data = yaml.safe_load((tmp_path / "reviews" / "t" / "pick.yaml").read_text())
    assert all(c["scores"]["identity"] is None for c in data["candidates"])
    assert all(c["scores"]["score"] == c["scores"]["text"] for c in data["candidates"])
    assert sum(c["keep"] for c in data["candidates"]) == 2


# ---------------------------------------------------------------------------------------------
# one real run: tiny diffusion model -> SDEdit -> tiny CLIP


@pytest.mark.slow
def test_real_root_edit_select_by_clip(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        version: 1
        name: s
        model: tiny
        defaults: {steps: 4, seed: 7}
        roots:
          r: {prompt: "a photo of a robot", candidates: 1}
        edits:
          e: {from: r, prompts: ["a red robot", "a blue robot"], candidates: 2, strength: 0.5}
        select:
          pick:
            from: e
            by: clip
            clip: {model: caspec-tiny-clip, top_k: 2, min_identity: 0.1}
    """))
    loaded, store = load_spec(path), LocalStore(tmp_path / ".caspec")
    s = run(loaded, store, plan=make_plan(loaded, store))
    assert statuses(s) == {"r": "ran", "e": "ran", "pick": "ran"}, s.outcomes["pick"].message
    out = tmp_path / "out" / "s"
    assert (out / "e" / "sources" / "s0.png").is_file()
    data = yaml.safe_load((tmp_path / "reviews" / "s" / "pick.yaml").read_text())
    kept = sorted(c["id"] for c in data["candidates"] if c["keep"])
    assert len(kept) == 2 and sorted(data["auto"]["keep"]) == sorted(c["digest"] for c in data["candidates"] if c["keep"])
    assert all(c["scores"]["identity"] is not None and c["scores"]["text"] is not None for c in data["candidates"])
    assert sorted(p.stem for p in (out / "pick").glob("*.png")) == kept
    for k in kept:
        assert (out / "pick" / f"{k}.png").read_bytes() == (out / "e" / f"{k}.png").read_bytes()
    assert {n.status for n in make_plan(loaded, store).nodes.values()} == {"cached"}
