"""`select` with `by: clip`: the pure decision on fixed similarities, cache keys at plan level, the
executor on fast fake image ops with the tiny CLIP, and one real run on the tiny diffusion model."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fakeops import fake_ops
from caspec.exec.runner import run
from caspec.ops.base import Op, image_entry
from caspec.metrics.edit_score import EditScore, directional_similarity, score_candidate
from caspec.ops.select_clip import SCORE_FORMULA, Settings, decide
from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

# ---------------------------------------------------------------------------------------------
# the pure decision


def E(direction=None, text=None, identity=None, text_gain=None, noop=False):
    return EditScore(text=text, identity=identity, direction=direction, text_gain=text_gain, noop=noop)


def roots(*texts):
    return [EditScore(text=t) for t in texts]


def test_score_is_the_edit_not_the_image():
    assert E(0.4, text=0.3, identity=0.9).score == pytest.approx(0.4)  # ranked by direction
    assert E(text=0.3, identity=0.9, text_gain=0.1).score == pytest.approx(0.1)  # source prompt unknown
    assert EditScore(text=0.3).score == pytest.approx(0.3)  # roots: text only
    assert E(text=0.3, identity=0.99, noop=True).formula == "noop" and E(noop=True).edit is None
    assert "cos(I(c) - I(s), T(p) - T(q))" in SCORE_FORMULA and "text + identity" not in SCORE_FORMULA


def test_a_near_copy_loses_to_a_real_edit():
    # the measurement: a real edit (text 0.30, identity 0.75) and a near-copy (0.28, 0.97)
    d = decide([E(0.35, text=0.30, identity=0.75), E(0.05, text=0.28, identity=0.97)], None, Settings(count=1))
    assert d.kept == [0]
    assert "min_relative_direction 0.6" in d.why[1]


def test_noop_edits_never_pass_beside_real_edits():
    scores = [E(text=0.7, identity=0.97, noop=True), E(0.2, text=0.3, identity=0.6), E(text=0.7, identity=0.98, noop=True)]
    d = decide(scores, None, Settings(min_relative_direction=None, min_direction=None), ids="abc")
    assert d.kept == [1] and d.passed == [False, True, False]
    assert "no-op edit" in d.why[0]
    d = decide(scores, None, Settings(count=2), ids="abc")  # too few real edits: the step fails, no no-op fills in
    assert d.kept == [1] and "needs exactly 2" in d.problem
    # a step of no-ops only (variations of the source's prompt) ranks them by text, like roots
    d = decide([E(text=0.5, identity=0.9, noop=True), E(text=0.6, identity=0.9, noop=True)], None, Settings(top_k=1))
    assert d.kept == [1]


def test_direction_thresholds_absolute_and_within_a_source():
    scores = [E(0.9), E(0.5), E(-0.1), E(0.0), E(0.3), E(0.25)]
    sources = ["s0", "s0", "s0", "s1", "s1", "s1"]
    d = decide(scores, None, Settings(), ids="abcdef", sources=sources)
    assert d.passed == [True, False, False, False, True, True]  # 0.5 < 0.6 x 0.9; 0.25 >= 0.6 x 0.3
    assert "direction -0.100 <= min_direction 0" in d.why[2] and "direction 0.000 <= min_direction 0" in d.why[3]
    assert "min_relative_direction 0.6 x the best of its source (0.900)" in d.why[1]
    assert d.relative[1] == pytest.approx(0.5 / 0.9) and d.relative[5] == pytest.approx(0.25 / 0.3)
    assert d.kept == [0, 4, 5]
    # the same scores as one source: the best of all sets the bar
    assert decide(scores, None, Settings()).passed == [True, False, False, False, False, False]
    # both off: everything but nothing is refused
    assert all(decide(scores, None, Settings(min_direction=None, min_relative_direction=None)).passed)


def test_thresholds_each_apply_and_say_why():
    text = [0.30, 0.10, 0.30, 0.30, 0.25]
    ident = [0.90, 0.90, 0.50, 0.99, None]  # the last has no source: identity thresholds skip it
    scores = [E(0.5, text=t, identity=i) if i is not None else EditScore(text=t) for t, i in zip(text, ident)]
    d = decide(scores, None, Settings(min_text=0.2, min_identity=0.6, max_identity=0.95), ids="abcde")
    assert d.passed == [True, False, False, False, True]
    assert "text 0.100 < min_text 0.2" in d.why[1]
    assert "identity 0.500 < min_identity 0.6" in d.why[2]
    assert "identity 0.990 > max_identity 0.95" in d.why[3]
    assert d.kept == [0, 4]  # best score first
    assert d.problem == ""


def test_ranking_and_top_k():
    d = decide([E(0.7), E(0.8), E(0.9), E(1.0)], None, Settings(top_k=2))
    assert d.kept == [3, 2]
    assert d.scores[3] == pytest.approx(1.0)
    assert "beyond top_k 2" in d.why[1]
    # ties go to the earlier candidate
    assert decide(roots(0.2, 0.2, 0.2), None, Settings(top_k=1)).kept == [0]


def test_near_duplicates_drop_the_lower_ranked():
    scores = roots(0.4, 0.3, 0.2)
    dup = [[1.0, 0.99, 0.1], [0.99, 1.0, 0.2], [0.1, 0.2, 1.0]]
    d = decide(scores, dup, Settings(max_duplicate=0.95), ids=["x", "y", "z"])
    assert d.kept == [0, 2]
    assert "near-duplicate of x (0.990 > max_duplicate 0.95)" in d.why[1]
    # a dropped duplicate does not take a top_k slot
    assert decide(scores, dup, Settings(max_duplicate=0.95, top_k=2)).kept == [0, 2]
    # without max_duplicate nothing is dropped
    assert decide(scores, dup, Settings()).kept == [0, 1, 2]


def test_count_keeps_exactly_the_best_n():
    d = decide(roots(0.1, 0.4, 0.3, 0.2), None, Settings(count=2, top_k=3))
    assert d.kept == [1, 2] and d.problem == ""
    assert "beyond count 2" in d.why[3]


def test_too_few_fails_listing_best_scores():
    scores = [E(0.9, text=0.10, identity=0.9), E(0.8, text=0.35, identity=0.4), E(0.7, text=0.20, identity=0.7)]
    d = decide(scores, None, Settings(min_text=0.3, min_identity=0.8, min_keep=2), ids=["a", "b", "c"])
    assert d.kept == []
    assert "only 0 of 3 candidate(s) kept, the step needs at least 2" in d.problem
    # best first, with scores and what each failed
    assert d.problem.index("a: score 0.900") < d.problem.index("b: score 0.800") < d.problem.index("c: score 0.700")
    assert "direction 0.900, text 0.100, identity 0.900" in d.problem
    assert "text 0.100 < min_text 0.3" in d.problem and "identity 0.400 < min_identity 0.8" in d.problem
    d = decide(roots(0.5, 0.1), None, Settings(min_text=0.3, count=2))
    assert "needs exactly 2" in d.problem
    d = decide(roots(0.5, 0.4, 0.3), None, Settings(count=3, top_k=2))
    assert "`top_k: 2` keeps fewer than the 3" in d.problem


def test_directional_similarity_on_vectors():
    t = torch.tensor
    src, red, blue = t([1.0, 0.0, 0.0]), t([0.0, 1.0, 0.0]), t([0.0, 0.0, 1.0])
    moved = (src + red) / (src + red).norm()  # the image moved towards "red"
    assert directional_similarity(moved, src, red, blue) > 0.5
    assert directional_similarity(src, src, red, blue) == 0.0  # an unchanged copy shows no edit
    assert directional_similarity(moved, src, red, red) is None  # no text direction: a no-op edit
    sc = score_candidate(moved, source=src, prompt=red, source_prompt=red)
    assert sc.noop and sc.formula == "noop"
    sc = score_candidate(moved, source=src, prompt=red)  # source prompt unknown: text gain
    assert sc.formula == "text_gain" and sc.text_gain == pytest.approx(float(moved @ red) - float(src @ red))
    assert score_candidate(moved, prompt=red).formula == "text"


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
                                              source_index=s, source_file=f"sources/s{s}.png",
                                              source_prompt=src.get("prompt")))
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
                 "{model: caspec-tiny-clip, top_k: 2, min_keep: 2}",
                 "{model: caspec-tiny-clip, top_k: 2, min_direction: 0.1}",
                 "{model: caspec-tiny-clip, top_k: 2, min_relative_direction: 0.5}"):
        keys.add(plan(*write(tmp_path, clip)).nodes["pick"].key)
    assert len(keys) == 8
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
    # `model: tiny` with no weights named: random weights, and the manifest says so
    assert data["auto"]["pretrained"] == "random" and data["auto"]["random_weights"] is True
    assert "random weights" in data["auto"]["warning"]
    for c in cands:
        sc = c["scores"]
        assert set(sc) == {"text", "identity", "direction", "text_gain", "relative", "formula", "score", "passed", "why"}
        assert sc["formula"] == "direction" and sc["score"] == sc["direction"]
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
            clip: {model: caspec-tiny-clip, top_k: 2, min_identity: 0.1, min_direction: null}
    """))  # random CLIP weights: directions are noise, so the direction floor is off here
    loaded, store = load_spec(path), LocalStore(tmp_path / ".caspec")
    s = run(loaded, store, plan=make_plan(loaded, store))
    assert statuses(s) == {"r": "ran", "e": "ran", "pick": "ran"}, s.outcomes["pick"].message
    out = tmp_path / "out" / "s"
    assert (out / "e" / "sources" / "s0.png").is_file()
    data = yaml.safe_load((tmp_path / "reviews" / "s" / "pick.yaml").read_text())
    kept = sorted(c["id"] for c in data["candidates"] if c["keep"])
    assert len(kept) == 2 and sorted(data["auto"]["keep"]) == sorted(c["digest"] for c in data["candidates"] if c["keep"])
    assert all(c["scores"]["identity"] is not None and c["scores"]["text"] is not None for c in data["candidates"])
    # the edit step records its source's prompt, so every candidate is scored by its direction
    assert all(c["scores"]["formula"] == "direction" and c["scores"]["direction"] is not None for c in data["candidates"])
    edit = store.get(make_plan(loaded, store).nodes["e"].key).result["images"]
    assert {img["source_prompt"] for img in edit} == {"a photo of a robot"}
    assert sorted(p.stem for p in (out / "pick").glob("*.png")) == kept
    for k in kept:
        assert (out / "pick" / f"{k}.png").read_bytes() == (out / "e" / f"{k}.png").read_bytes()
    assert {n.status for n in make_plan(loaded, store).nodes.values()} == {"cached"}


def test_a_noop_edit_is_never_kept_beside_real_edits(tmp_path, png_ops):
    # the measurement: one prompt equal to the root's (a no-op), one real edit; selecting 2 kept two
    # unchanged copies under `text + identity`. Thresholds off: only the no-op rule decides here.
    loaded, store = write(tmp_path, "{model: caspec-tiny-clip, top_k: 2, min_direction: null, "
                                    "min_relative_direction: null}")
    (tmp_path / "t.yaml").write_text((tmp_path / "t.yaml").read_text()
                                     .replace('prompts: ["a red robot", "a blue robot"]', 'prompts: ["a robot", "a red robot"]'))
    loaded = load_spec(tmp_path / "t.yaml")
    s = go(loaded, store)
    assert statuses(s)["pick"] == "ran", s.outcomes["pick"].message
    data = yaml.safe_load((tmp_path / "reviews" / "t" / "pick.yaml").read_text())
    kept = sorted(c["id"] for c in data["candidates"] if c["keep"])
    assert kept == ["s0-p1-c0", "s0-p1-c1"]
    noops = [c for c in data["candidates"] if c["prompt"] == "a robot"]
    assert len(noops) == 2 and all(c["scores"]["formula"] == "noop" and not c["scores"]["passed"] for c in noops)
    assert all(c["scores"]["identity"] > 0.99 for c in noops if c["id"].endswith("c0"))  # a copy of the source


def test_clip_runs_on_the_models_device(tmp_path, png_ops, monkeypatch):
    from caspec.metrics import clip as clipmod

    seen = []
    real = clipmod.load_clip
    monkeypatch.setattr(clipmod, "load_clip", lambda spec, device="cpu": seen.append(device) or real(spec, "cpu"))
    loaded, store = write(tmp_path)
    (tmp_path / "t.yaml").write_text((tmp_path / "t.yaml").read_text().replace("name: t", "name: t\nmodel: {device: cuda}"))
    s = go(load_spec(tmp_path / "t.yaml"), store)
    assert statuses(s)["pick"] == "ran", s.outcomes["pick"].message
    assert seen == ["cuda"]
