"""CLIP is never random by accident (issue 12): weights found in the local Hugging Face cache as open_clip
resolves tags, refused before anything runs when they cannot be found (FILE:LINE:COL, exit 2), random only
when asked for (or with the embedded models) and then said in every output; CLIP on the model's device."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from caspec.cli import main
from caspec.errors import SpecError
from caspec.metrics import clip as clipmod
from caspec.metrics.clip import ClipSpec, ClipWeightsError, check_weights, clear_clip_cache, clip_identity, load_clip
from caspec.spec.load import load_spec_text

TAG = "caspec_test"  # open_clip tags are lower case with underscores
REPO = "caspec-org/tiny-clip-test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache (HF_HUB_CACHE) and a test-only tag of `caspec-tiny-clip` whose `hf_hub`
    entry names REPO (registered in the table caspec reads open_clip's tags from)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    table = clipmod.pretrained_table()
    monkeypatch.setitem(table, "caspec-tiny-clip", {TAG: {"url": "", "hf_hub": f"{REPO}/", "quick_gelu": False,
                                                          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}})
    yield cache
    clear_clip_cache()


def put_in_cache(cache: Path, filename: str, data: bytes, repo: str = REPO, commit: str = COMMIT) -> Path:
    """A file laid out as huggingface_hub caches it: blobs, a snapshot link and refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).write_bytes(data)
    return snap / filename


def tiny_state(seed: int):
    """A state dict of `caspec-tiny-clip`, with weights other than the random-init ones."""
    import torch

    base = load_clip(ClipSpec("caspec-tiny-clip", pretrained="random"))
    gen = torch.Generator().manual_seed(seed)
    return {k: (v.detach().clone() + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
            for k, v in base.model.state_dict().items()}


def test_tag_loads_the_weights_written_into_the_hub_cache(hub):
    import torch
    from safetensors.torch import save

    state = tiny_state(1)
    put_in_cache(hub, "open_clip_model.safetensors", save({k: v.contiguous() for k, v in state.items()}))
    spec = ClipSpec("caspec-tiny-clip", pretrained=TAG)
    check_weights(spec)  # pure: found
    ident = clip_identity(spec)
    assert ident["weights"] == {"repo": REPO, "file": "open_clip_model.safetensors", "revision": COMMIT}
    assert "init_seed" not in ident and "random_weights" not in ident
    clip = load_clip(spec)
    loaded = clip.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # the tag's preprocessing (mean/std) is used, as open_clip would
    assert tuple(round(float(m), 3) for m in clip.preprocess.transforms[-1].mean) == (0.5, 0.5, 0.5)


def test_the_pickled_file_is_the_fallback_as_in_open_clip(hub):
    import torch

    state = tiny_state(2)
    path = put_in_cache(hub, "open_clip_pytorch_model.bin", b"")
    torch.save(state, path)
    found = clipmod.find_pretrained("caspec-tiny-clip", TAG)
    assert found.path == path and found.filename == "open_clip_pytorch_model.bin"
    loaded = load_clip(ClipSpec("caspec-tiny-clip", pretrained=TAG)).model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_weights_are_a_clear_error_with_an_offline_hint(hub):
    with pytest.raises(ClipWeightsError) as err:
        check_weights(ClipSpec("caspec-tiny-clip", pretrained=TAG))
    e = err.value
    assert e.field == "pretrained"
    assert f"`{TAG}` weights" in e.message and "not in the local Hugging Face cache" in e.message
    assert str(hub) in e.message and f"{REPO}/open_clip_model.safetensors" in e.message
    assert f"hf download {REPO} open_clip_model.safetensors" in e.hint and "HF_HUB_CACHE" in e.hint
    assert f"models--{REPO.replace('/', '--')}" in e.hint
    with pytest.raises(ClipWeightsError, match="no pretrained tag `nope`"):
        check_weights(ClipSpec("caspec-tiny-clip", pretrained="nope"))
    with pytest.raises(ClipWeightsError) as err:  # loading says the same, before building anything
        load_clip(ClipSpec("caspec-tiny-clip", pretrained=TAG))
    assert "not in the local Hugging Face cache" in err.value.message


def test_no_weights_named_is_refused_unless_random_is_asked_for():
    with pytest.raises(ClipWeightsError) as err:
        check_weights(ClipSpec("ViT-B-32"))
    assert "has no weights" in err.value.message and "pretrained: random" in err.value.hint
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in err.value.hint
    with pytest.raises(ClipWeightsError):
        load_clip(ClipSpec("caspec-tiny-clip"))  # the library does not pick random weights either
    check_weights(ClipSpec("ViT-B-32", pretrained="random"))
    check_weights(ClipSpec("caspec-toy-clip"))  # shipped weights


def test_caspec_reads_the_same_tag_table_as_open_clip():
    import open_clip.pretrained as real

    assert clipmod.pretrained_table() == real._PRETRAINED
    assert clipmod.pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k") == real.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")


# ---------------------------------------------------------------------------------------------
# the spec: refused at load time, with the field's position


SPEC = """\
version: 1
model: {model}
roots: {{r: {{prompt: "a cat", candidates: 1}}}}
edits: {{e: {{from: r, prompts: ["a dog"], candidates: 1}}}}
select:
  pick:
    from: e
    by: clip
{clip}
"""


def spec_text(model: str, clip: str = "") -> str:
    return SPEC.format(model=model, clip=textwrap.indent(clip, "    ") if clip else "")


def test_a_real_model_needs_named_weights_at_load_time(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec_text(spec_text("./sd15"), tmp_path / "s.yaml")
    p = err.value.problems[0]
    assert (p.line, p.col) == (8, 9) and p.path == "select.pick.clip.pretrained"  # no `clip:`: at `by: clip`
    assert "has no weights" in p.message and "pretrained: random" in p.hint
    with pytest.raises(SpecError) as err:
        load_spec_text(spec_text("./sd15", "clip: {model: ViT-B-32, pretrained: laion2b_s34b_b79k}"), tmp_path / "s.yaml")
    p = err.value.problems[0]
    assert (p.line, p.col) == (9, 41) and "not in the local Hugging Face cache" in p.message and p.hint
    with pytest.raises(SpecError) as err:
        load_spec_text(spec_text("./sd15", "clip: {model: ViT-B-32, pretrained: random}") + textwrap.dedent("""
            eval:
              q: {from: c}
            compose:
              c: {assets: [a/b], prompts: [x]}
        """), tmp_path / "s.yaml")
    assert any(q.path == "eval.q.clip.pretrained" for q in err.value.problems)  # eval's default CLIP too
    loaded = load_spec_text(spec_text("./sd15", "clip: {model: ViT-B-32, pretrained: random}"), tmp_path / "s.yaml")
    assert loaded.spec.select["pick"].clip.pretrained == "random"


def test_embedded_models_default_to_their_clip(tmp_path):
    tiny = load_spec_text(spec_text("tiny"), tmp_path / "s.yaml").spec
    assert tiny.select["pick"].clip.model == "caspec-tiny-clip"
    assert load_spec_text(spec_text("toy"), tmp_path / "s.yaml").spec.select["pick"].clip.model == "caspec-toy-clip"
    # with `tiny`, a CLIP without weights is random (and says so), on real models it is an error
    assert clipmod.for_spec("ViT-B-32", None, None, "tiny").pretrained == "random"
    assert clipmod.for_spec("ViT-B-32", None, None, "./sd15").pretrained is None
    assert clipmod.for_spec("caspec-toy-clip", None, None, "toy").pretrained is None  # shipped weights


def test_cli_validate_exits_2_with_position(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(spec_text("./sd15"))
    r = CliRunner().invoke(main, ["validate", str(path)], catch_exceptions=False)
    assert r.exit_code == 2
    assert f"{path}:8:9: error: select.pick.clip.pretrained: CLIP `ViT-B-32` has no weights" in r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.stderr


def test_planning_with_a_cached_tag_imports_no_torch(tmp_path):
    cache = tmp_path / "hub"
    put_in_cache(cache, "open_clip_model.safetensors", b"not loaded by planning",
                 repo="laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text("tiny", "clip: {model: ViT-B-32, pretrained: laion2b_s34b_b79k}"))
    code = ("import sys, json, pathlib; from caspec.spec.load import load_spec; from caspec.plan.graph import make_plan;"
            "from caspec.store import open_store;"
            f"p = make_plan(load_spec({str(spec)!r}), open_store(pathlib.Path({str(tmp_path / 'st')!r})), "
            "model_identity={'k': 1});"
            "print(json.dumps(['torch' in sys.modules, p.nodes['pick'].status]))")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, "run"]


# ---------------------------------------------------------------------------------------------
# the device: the spec's model's


def test_select_and_eval_load_clip_on_the_models_device(tmp_path, monkeypatch):
    from PIL import Image

    from caspec.ops.base import RunContext
    from caspec.ops.eval import EvalOp
    from caspec.spec.models import ModelSpec

    seen: list[str] = []
    real = clipmod.load_clip

    def spy(spec, device="cpu"):
        seen.append(device)
        return real(spec, device="cpu")  # no GPU here: the choice is what is tested

    monkeypatch.setattr(clipmod, "load_clip", spy)
    params = {"model": "caspec-tiny-clip", "pretrained": "random"}
    clipmod.load_step_clip(params, None, ModelSpec(base="tiny", device="cuda"))
    clipmod.load_step_clip(params, None, ModelSpec(base="tiny", device="cpu"))
    assert seen == ["cuda", "cpu"]

    class Up:
        key = "k"
        result = {"images": [{"file": "a.png", "prompt": "a <w>", "assets": [{"asset": "w"}]}]}

        def file(self, rel):
            return tmp_path / rel

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "card.yaml").write_text("pseudo_words: [{token: '<w>'}]\n")
    loaded = load_spec_text(textwrap.dedent("""\
        version: 1
        model: {base: tiny, device: cuda}
        compose: {c: {assets: [x/y], prompts: ["a <w>"]}}
        eval: {q: {from: c, describe: {"<w>": thing}}}
    """), tmp_path / "s.yaml")
    step = loaded.spec.eval["q"]
    op = EvalOp()
    ctx = RunContext(step_id="q", spec_name="s", key="k", params=op.params(step, loaded.spec), out_dir=out,
                     spec_dir=tmp_path, model=loaded.spec.model, upstream={"images0": Up()})
    op.run(ctx)
    assert seen[-1] == "cuda"
    result = json.loads((out / "eval.json").read_text())
    assert result["clip"]["random_weights"] is True and "meaningless" in result["clip"]["warning"]
