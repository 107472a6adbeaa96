"""Step kinds `root` (GenerateOp) and `edit` (EditOp) on the tiny model, with a fake upstream."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from caspec.errors import CaspecError, StepFailed  # noqa: E402
from caspec.ops.base import RunContext  # noqa: E402
from caspec.ops.edit import EditOp  # noqa: E402
from caspec.ops.generate import GenerateOp  # noqa: E402
from caspec.ops.images import fit_square, read_png_meta, save_png  # noqa: E402
from caspec.ops.seeds import SEED_MASK, derive_seed  # noqa: E402
from caspec.spec.models import ModelSpec, Spec  # noqa: E402

STEPS = 4




MODEL = ModelSpec(base="tiny", device="cpu")


class FakeUpstream:
    """What the executor hands an op for a finished upstream step."""

    def __init__(self, key: str, result: dict, folder: Path):
        self.key = key
        self.folder = folder
        self.result = {"images": [dict(e, digest=self.digest(e["file"])) for e in result["images"]]}

    def file(self, relpath: str) -> Path:
        return self.folder / relpath

    def digest(self, relpath: str) -> str:
        return hashlib.sha256((self.folder / relpath).read_bytes()).hexdigest()


def _spec(**sections) -> Spec:
    return Spec.model_validate({"defaults": {"steps": STEPS, "seed": 3}, **sections})


def _ctx(tmp_path: Path, name: str, params: dict, *, upstream=None, inputs=None, progress=None) -> RunContext:
    out = tmp_path / name
    out.mkdir()
    kw = {}
    if progress is not None:
        kw["progress"] = progress
    return RunContext(step_id=name, spec_name="t", key="k-" + name, params=params, out_dir=out, spec_dir=tmp_path,
                      model=MODEL, upstream=upstream or {}, inputs=inputs or {}, **kw)


def _pixels(path: Path) -> bytes:
    with Image.open(path) as img:
        return img.convert("RGB").tobytes()


# -- seeds and PNG helpers -------------------------------------------------------------------------


def test_derive_seed_is_frozen_and_63_bit():
    s = derive_seed(0, "root", "a robot", 0)
    assert s == derive_seed(0, "root", "a robot", 0)
    assert 0 <= s <= SEED_MASK
    payload = '[0,"root","a robot",0]'.encode()
    assert s == int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & SEED_MASK
    assert len({derive_seed(0, "root", "a robot", k) for k in range(50)}) == 50
    assert derive_seed(1, "root", "a robot", 0) != s
    assert derive_seed(0, "root", "a robot!", 0) != s
    with pytest.raises(TypeError):
        derive_seed("0", "x")


def test_save_png_metadata_roundtrip(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    path = save_png(tmp_path / "a.png", img, {"prompt": "a café robot ☃", "seed": 12, "guidance_scale": 7.5,
                                               "source": None})
    meta = read_png_meta(path)
    assert meta["prompt"] == "a café robot ☃" and meta["seed"] == "12" and meta["guidance_scale"] == "7.5"
    # nothing that changes when the pixels do not (issue 28): no step key, no caspec version
    assert "source" not in meta and "caspec_version" not in meta and "key" not in meta
    assert path.read_bytes() == save_png(tmp_path / "b.png", img, {"prompt": "a café robot ☃", "seed": 12,
                                                                    "guidance_scale": 7.5}).read_bytes()


def test_fit_square_center_crops():
    img = Image.new("RGB", (30, 10))
    img.paste((255, 0, 0), (10, 0, 20, 10))  # a red centre square
    out = fit_square(img, 16)
    assert out.size == (16, 16) and out.getpixel((8, 8)) == (255, 0, 0)


# -- params ------------------------------------------------------------------------------------------


def test_root_params():
    spec = _spec(roots={"r": {"prompt": "a robot", "candidates": 2, "guidance_scale": 5}})
    params = GenerateOp().params(spec.roots["r"], spec)
    assert params == {"mode": "generate", "prompt": "a robot", "negative_prompt": "", "candidates": 2, "seed": 3,
                      "steps": STEPS, "guidance_scale": 5.0, "resolution": None, "scheduler": "ddim"}
    assert GenerateOp().inputs(spec.roots["r"], Path("/x")) == {}
    assert GenerateOp.KIND == "root"


def test_image_root_params_and_inputs(tmp_path):
    spec = _spec(roots={"r": {"image": "pics/me.png", "resolution": 64}})
    assert GenerateOp().params(spec.roots["r"], spec) == {"mode": "image", "resolution": 64}
    assert GenerateOp().inputs(spec.roots["r"], tmp_path) == {"image": (tmp_path / "pics" / "me.png").resolve()}


def test_edit_params_and_upstream():
    spec = _spec(roots={"r": {"prompt": "a robot"}},
                 edits={"e": {"from": "r", "prompts": "a green robot", "pick": 1, "negative_prompt": "ugly"}})
    step = spec.edits["e"]
    assert EditOp().params(step, spec) == {
        "prompts": ["a green robot"], "pick": [1], "strength": 0.86, "candidates": 4, "seed": 3, "steps": STEPS,
        "guidance_scale": 7.5, "negative_prompt": "ugly", "resolution": None, "scheduler": "ddim"}
    assert EditOp().upstream(step) == {"source": "r"}
    assert EditOp.KIND == "edit"


# -- running -----------------------------------------------------------------------------------------


def _root_params(candidates: int) -> dict:
    spec = _spec(roots={"r": {"prompt": "a robot", "candidates": candidates}})
    return GenerateOp().params(spec.roots["r"], spec)


@pytest.fixture(scope="module")
def root_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("root")
    progress = []
    ctx = _ctx(tmp, "r", _root_params(2), progress=lambda d, t, desc: progress.append((d, t, desc)))
    result = GenerateOp().run(ctx)
    return ctx, result, progress


def test_root_run_writes_candidates_with_metadata(root_run):
    ctx, result, progress = root_run
    images = result["images"]
    assert [e["id"] for e in images] == ["c000", "c001"]
    assert [e["file"] for e in images] == ["c000.png", "c001.png"]
    for k, e in enumerate(images):
        assert e["seed"] == derive_seed(3, "root", "a robot", k)
        assert (e["prompt"], e["negative_prompt"], e["source"], e["candidate"]) == ("a robot", "", None, k)
        path = ctx.out_dir / e["file"]
        with Image.open(path) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
        meta = read_png_meta(path)
        assert meta["prompt"] == "a robot" and meta["seed"] == str(e["seed"])
        assert meta["step"] == "r" and "key" not in meta and meta["steps"] == str(STEPS)
        assert meta["guidance_scale"] == "7.5" and "caspec_version" not in meta
    assert sorted(p.name for p in ctx.out_dir.iterdir()) == ["c000.png", "c001.png"]
    assert progress[-1][:2] == (2, 2) and "r" in progress[-1][2]


def test_root_more_candidates_keeps_existing_images(root_run, tmp_path):
    ctx, result, _ = root_run
    more = GenerateOp().run(_ctx(tmp_path, "r3", _root_params(3)))
    assert [e["id"] for e in more["images"]] == ["c000", "c001", "c002"]
    for e in result["images"]:
        assert _pixels(tmp_path / "r3" / e["file"]) == _pixels(ctx.out_dir / e["file"])
    assert _pixels(tmp_path / "r3" / "c002.png") != _pixels(ctx.out_dir / "c000.png")


def test_image_root_copies_and_fits(tmp_path):
    src = tmp_path / "me.jpg"
    Image.new("RGB", (120, 80), (200, 100, 50)).save(src)
    ctx = _ctx(tmp_path, "img", {"mode": "image", "resolution": None}, inputs={"image": src})
    result = GenerateOp().run(ctx)
    assert [(e["id"], e["file"]) for e in result["images"]] == [("c000", "c000.png")]
    with Image.open(ctx.out_dir / "c000.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        assert img.getpixel((32, 32)) == (200, 100, 50)


def test_image_root_unreadable_is_a_step_failure(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for path in (bad, tmp_path / "missing.png"):
        ctx = _ctx(tmp_path, f"img-{path.stem}", {"mode": "image", "resolution": 64}, inputs={"image": path})
        with pytest.raises(StepFailed) as err:
            GenerateOp().run(ctx)
        assert "cannot read root image" in err.value.message and err.value.hint
        assert isinstance(err.value, CaspecError)


def _edit_params(candidates=2, prompts=("a green robot", "a blue robot"), pick=None) -> dict:
    spec = _spec(roots={"r": {"prompt": "a robot"}},
                 edits={"e": {"from": "r", "prompts": list(prompts), "candidates": candidates, "pick": pick,
                              "strength": 0.5}})
    return EditOp().params(spec.edits["e"], spec)


def test_edit_run_ids_seeds_and_metadata(root_run, tmp_path):
    rctx, rresult, _ = root_run
    up = FakeUpstream(rctx.key, rresult, rctx.out_dir)
    progress = []
    ctx = _ctx(tmp_path, "e", _edit_params(pick=[1]), upstream={"source": up},
               progress=lambda d, t, desc: progress.append((d, t)))
    result = EditOp().run(ctx)
    ids = [e["id"] for e in result["images"]]
    assert ids == ["s1-p0-c0", "s1-p0-c1", "s1-p1-c0", "s1-p1-c1"]
    digest = up.result["images"][1]["digest"]
    for e in result["images"]:
        prompt = ["a green robot", "a blue robot"][e["prompt_index"]]
        assert e["file"] == e["id"] + ".png"
        assert e["seed"] == derive_seed(3, "edit", digest, prompt, e["candidate"])
        assert e["source"] == "c001" and e["prompt"] == prompt
        meta = read_png_meta(ctx.out_dir / e["file"])
        assert meta["strength"] == "0.5" and meta["source"] == "c001" and meta["prompt"] == prompt
        assert meta["seed"] == str(e["seed"]) and "key" not in meta and meta["step"] == "e"
    assert progress[-1] == (4, 4)


def test_edit_adding_candidates_and_prompts_keeps_images(root_run, tmp_path):
    rctx, rresult, _ = root_run
    up = FakeUpstream(rctx.key, rresult, rctx.out_dir)
    small = EditOp().run(_ctx(tmp_path, "e1", _edit_params(candidates=1, prompts=["a blue robot"], pick=[0]),
                              upstream={"source": up}))
    big = EditOp().run(_ctx(tmp_path, "e2", _edit_params(candidates=2, prompts=["a green robot", "a blue robot"]),
                            upstream={"source": up}))
    assert [e["id"] for e in small["images"]] == ["s0-p0-c0"]
    assert len(big["images"]) == 2 * 2 * 2
    same = next(e for e in big["images"] if e["source"] == "c000" and e["prompt"] == "a blue robot"
                and e["candidate"] == 0)
    assert same["id"] == "s0-p1-c0" and same["seed"] == small["images"][0]["seed"]
    # same seed, same pixels (batches run at a fixed shape, so companions and position do not matter)
    assert _pixels(tmp_path / "e1" / "s0-p0-c0.png") == _pixels(tmp_path / "e2" / same["file"])


def test_edit_pick_out_of_range(root_run, tmp_path):
    rctx, rresult, _ = root_run
    up = FakeUpstream(rctx.key, rresult, rctx.out_dir)
    with pytest.raises(StepFailed) as err:
        EditOp().run(_ctx(tmp_path, "bad", _edit_params(pick=[0, 5]), upstream={"source": up}))
    assert "5" in err.value.message and "0..1" in err.value.message
    with pytest.raises(StepFailed, match="more than once"):
        EditOp().run(_ctx(tmp_path, "dup", _edit_params(pick=[1, 1]), upstream={"source": up}))
