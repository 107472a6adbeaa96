"""Exporting concept assets (caspec.assets.export) and importing them back (caspec.assets.importer).

The asset is built by hand on the tiny model: LoRA injected with caspec's own helpers (so the peft key
layout is the real one), random weights, rank 4 with alpha 8 (scale 2: a lost alpha shows), two pseudo-words.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from caspec.assets import export as ex  # noqa: E402
from caspec.assets import format as fmt  # noqa: E402
from caspec.assets.importer import UnsafeFileError, import_asset  # noqa: E402

RANK, ALPHA = 4, 8.0
UNET_T = ["to_q", "to_k", "to_v", "to_out.0"]
TE_T = ["q_proj", "k_proj", "v_proj", "out_proj"]
TOKENS = ["<shape1>", "<col1>"]
ROLES = {"<shape1>": "constant", "<col1>": "varied"}
INITS = {"<shape1>": "square", "<col1>": "red"}
PROMPT = "a photo of <shape1> <col1> on grey"


def fresh(tmp: Path):
    from caspec.models.load import load_pipeline
    from caspec.spec.models import ModelSpec

    return load_pipeline(ModelSpec(), tmp, fresh=True)


def sd_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                   unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def encode(pipe, text: str):
    tok = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids)[0]


def unet_out(pipe):
    g = torch.Generator().manual_seed(123)
    z = torch.randn(1, 4, 8, 8, generator=g)
    enc = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return pipe.unet(z, torch.tensor([500]), encoder_hidden_states=enc).sample


def outputs(pipe):
    return encode(pipe, PROMPT), unet_out(pipe)


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def deltas(asset) -> dict[tuple[str, str], torch.Tensor]:
    """Each layer's delta B @ A * alpha / rank, keyed by component and module path (no `text_model.`)."""
    out = {}
    for comp in fmt.COMPONENTS:
        for module, (a, b) in ex.lora_layers(asset.lora.get(comp) or {}).items():
            out[(comp, module.removeprefix("text_model."))] = (b.flatten(1) @ a.flatten(1)) * (
                asset.lora_alpha / asset.lora_rank)
    return out


def assert_same_asset(got, want, *, tokens=None, exact_meta=True):
    tokens = tokens or {t: t for t in want.tokens}
    assert got.tokens == [tokens[t] for t in want.tokens]
    for t in want.tokens:
        assert torch.equal(got.embeddings[tokens[t]], want.embeddings[t])
        if exact_meta:
            assert got.roles[tokens[t]] == want.roles[t]
            assert got.init_words[tokens[t]] == want.init_words[t]
    dg, dw = deltas(got), deltas(want)
    assert sorted(dg) == sorted(dw)
    for key in dw:
        assert torch.allclose(dg[key], dw[key], atol=1e-6, rtol=1e-6), key


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return build(tmp_path_factory.mktemp("export"), UNET_T)


def build(tmp: Path, unet_targets: list[str]) -> dict:
    """A random asset on `tiny` with LoRA on ``unet_targets``, and the reference outputs of apply_asset."""
    pipe = fresh(tmp)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for comp, module, targets in (("unet", pipe.unet, unet_targets), ("text_encoder", pipe.text_encoder, TE_T)):
        fmt.inject_lora(module, fmt.lora_config(RANK, ALPHA, targets), "build", trainable=False)
        state = fmt.lora_state_dict(module, "build")
        lora[comp] = {k: torch.randn(v.shape, generator=g) * (0.05 if ".lora_B." in k else 0.5)
                      for k, v in state.items()}
    d = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    emb = {t: torch.randn(d, generator=g) * 0.3 for t in TOKENS}
    folder = tmp / "my-asset"
    fmt.save_asset(folder, tokens=TOKENS, roles=ROLES, init_words=INITS, embeddings=emb, lora=lora, lora_rank=RANK,
                   lora_alpha=ALPHA, targets={"unet": unet_targets, "text_encoder": TE_T})
    fmt.write_card(folder, {"format": 1, "base_model": {"base": "tiny"},
                            "pseudo_words": [{"token": t, "init": INITS[t], "role": ROLES[t]} for t in TOKENS]})
    asset = fmt.load_asset(folder)
    ref = fresh(tmp)
    fmt.apply_asset(ref, asset)
    base = fresh(tmp)
    return {"tmp": tmp, "folder": folder, "asset": asset, "ref": outputs(ref), "base_unet": unet_out(base)}


# -- diffusers ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_diffusers_export_loads_with_diffusers_and_matches_apply_asset(made, tmp_path):
    asset = made["asset"]
    files = ex.export_asset(asset, "diffusers", tmp_path / "d")
    assert sorted(p.name for p in files) == ["col1.safetensors", "pytorch_lora_weights.safetensors",
                                             "shape1.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d" / "shape1.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["<shape1>"] and fh.get_tensor("<shape1>").shape == (1, 32)
    with safe_open(str(tmp_path / "d" / ex.DIFFUSERS_LORA_FILE), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA and meta["text_encoder.lora_alpha"] == ALPHA

    sd = sd_pipeline(fresh(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.load_lora_weights(str(tmp_path / "d"), adapter_name="x")
        sd.load_textual_inversion([str(p) for p in files if p.name != ex.DIFFUSERS_LORA_FILE])
    assert sd.unet.peft_config["x"].lora_alpha == ALPHA
    enc, unet = outputs(sd)
    ref_enc, ref_unet = made["ref"]
    assert close(enc, ref_enc)
    assert close(unet, ref_unet)
    assert (ref_unet - made["base_unet"]).abs().max() > 1e-3  # the LoRA matters: a wrong scale would show


@pytest.mark.slow
def test_conv_lora_exports_load_in_diffusers_and_import_back(tmp_path):
    """LoRA on the ResNet convolutions (`unet_targets: [..., conv1, conv2]`): the diffusers and kohya
    exports load with diffusers' own loaders into the model apply_asset makes, and import back exactly."""
    conv = build(tmp_path, UNET_T + ["conv1", "conv2"])
    asset = conv["asset"]
    assert any(".conv1.lora_A." in k and v.dim() == 4 for k, v in asset.lora["unet"].items())
    for kind in ("diffusers", "a1111"):
        files = ex.export_asset(asset, kind, tmp_path / kind)
        lora_file = tmp_path / kind / (ex.DIFFUSERS_LORA_FILE if kind == "diffusers" else "my-asset.safetensors")
        sd = sd_pipeline(fresh(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd.load_lora_weights(str(lora_file), adapter_name="c")
            for tok in TOKENS:  # a1111 files are named by the word, without the token's brackets
                sd.load_textual_inversion(str(tmp_path / kind / f"{ex.word_for(tok)}.safetensors"), token=tok)
        enc, unet = outputs(sd)
        assert close(enc, conv["ref"][0]) and close(unet, conv["ref"][1]), kind
        got = fmt.load_asset(import_asset(tmp_path / kind, tmp_path / f"imp-{kind}"))
        assert_same_asset(got, asset)
        assert got.targets["unet"] == UNET_T + ["conv1", "conv2"]
    # the convolutions matter: the same asset without them gives another UNet output
    assert (conv["ref"][1] - build(tmp_path / "attn", UNET_T)["ref"][1]).abs().max() > 1e-4


# -- kohya / a1111 / bundle ---------------------------------------------------------------------


def _peft_from_diffusers(state: dict) -> dict[str, dict]:
    """diffusers-converted kohya state dict -> component -> peft state dict (no `text_model.`)."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    te = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te, original_type=StateDictType.DIFFUSERS_OLD),
                                    original_type=StateDictType.DIFFUSERS)
    return {"unet": convert_unet_state_dict_to_peft(unet),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in te.items()}}


@pytest.mark.slow
def test_a1111_export_reads_back_with_diffusers(made, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    asset = made["asset"]
    files = ex.export_asset(asset, "a1111", tmp_path / "a")
    assert sorted(p.name for p in files) == ["col1.safetensors", "my-asset.safetensors", "shape1.safetensors"]
    for tok in TOKENS:
        emb = load_file(str(tmp_path / "a" / f"{ex.word_for(tok)}.safetensors"))
        assert list(emb) == ["emb_params"] and torch.equal(emb["emb_params"], asset.embeddings[tok].reshape(1, -1))
    kohya_path = tmp_path / "a" / "my-asset.safetensors"
    kohya = load_file(str(kohya_path))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(kohya)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert all(float(v) == ALPHA for k, v in kohya.items() if k.endswith(".alpha"))  # alpha/rank = 2, not 1

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(kohya_path))
    assert set(alphas.values()) == {ALPHA}
    back = _peft_from_diffusers(state)
    for comp in [c for c in fmt.COMPONENTS if asset.lora.get(c)]:  # SD 1.x: no text_encoder_2
        want = {k.removeprefix("text_model."): v for k, v in asset.lora[comp].items()}
        assert sorted(back[comp]) == sorted(want)
        assert all(torch.equal(back[comp][k], want[k]) for k in want)

    # and diffusers' loader gives the same model as apply_asset (alpha read from the `.alpha` keys)
    sd = sd_pipeline(fresh(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd.load_lora_weights(str(kohya_path), adapter_name="k")
        for tok in TOKENS:
            sd.load_textual_inversion(str(tmp_path / "a" / f"{ex.word_for(tok)}.safetensors"), token=tok)
    enc, unet = outputs(sd)
    assert close(enc, made["ref"][0]) and close(unet, made["ref"][1])


@pytest.mark.slow
def test_bundle_holds_kohya_lora_and_embeddings(made, tmp_path):
    from safetensors.torch import load_file

    asset = made["asset"]
    (bundle,) = ex.export_asset(asset, "bundle", tmp_path / "b")
    a1111 = ex.export_asset(asset, "a1111", tmp_path / "a")
    lora = load_file(str(next(p for p in a1111 if p.name == "my-asset.safetensors")))
    got = load_file(str(bundle))
    assert {k: v for k, v in got.items() if not k.startswith("bundle_emb.")}.keys() == lora.keys()
    assert all(torch.equal(got[k], lora[k]) for k in lora)
    for tok in TOKENS:
        key = f"bundle_emb.{ex.word_for(tok)}.string_to_param.*"
        assert torch.equal(got[key], asset.embeddings[tok].reshape(1, -1))
    # a file name works as target too, and the bytes do not depend on the run
    (again,) = ex.export_asset(asset, "bundle", tmp_path / "x.safetensors")
    assert again == tmp_path / "x.safetensors" and again.read_bytes() == bundle.read_bytes()


# -- import -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diffusers", "a1111", "bundle"])
def test_import_gives_back_the_asset(made, tmp_path, kind):
    asset = made["asset"]
    files = ex.export_asset(asset, kind, tmp_path / "exp")
    src = files[0] if kind == "bundle" else tmp_path / "exp"
    out = import_asset(src, tmp_path / "imp")
    got = fmt.load_asset(out)
    assert_same_asset(got, asset)
    assert (got.lora_rank, got.lora_alpha) == (RANK, ALPHA)
    assert got.targets == {"unet": UNET_T, "text_encoder": TE_T}
    assert got.card["imported"]["format"] == kind and got.card["base_model"]["base"] == "tiny"
    # renaming on the way in
    out2 = import_asset(src, tmp_path / "imp2", tokens={"shape1": "<sq9>", "<col1>": "<c9>"})
    assert_same_asset(fmt.load_asset(out2), asset, tokens={"<shape1>": "<sq9>", "<col1>": "<c9>"})


@pytest.mark.slow
def test_import_caspec_folder_is_a_copy(made, tmp_path):
    out = import_asset(made["folder"], tmp_path / "copy")
    for f in (fmt.EMBEDDINGS_FILE, fmt.LORA_FILE, fmt.CARD_FILE):
        assert (out / f).read_bytes() == (made["folder"] / f).read_bytes()
    with pytest.raises(ValueError, match="not an empty folder"):
        import_asset(made["folder"], tmp_path / "copy")


@pytest.mark.slow
def test_import_foreign_kohya_without_caspec_header(made, tmp_path):
    """Files from other tools: words from file names, module paths via diffusers' converters, mixed alphas folded."""
    from safetensors.torch import load_file

    asset = made["asset"]
    ex.export_asset(asset, "a1111", tmp_path / "exp")
    foreign = tmp_path / "foreign"
    odd = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    for p in sorted((tmp_path / "exp").iterdir()):
        tensors = load_file(str(p))
        if f"{odd}.alpha" in tensors:  # one layer with another alpha: its delta halves
            tensors[f"{odd}.alpha"] = torch.tensor(4.0)
        (foreign / p.name).parent.mkdir(exist_ok=True)
        (foreign / p.name).write_bytes(fmt.safetensors_bytes(tensors))  # no header metadata at all
    got = fmt.load_asset(import_asset(foreign, tmp_path / "imp"))
    assert sorted(got.tokens) == sorted(TOKENS) and got.roles == {t: "imported" for t in TOKENS}
    for t in TOKENS:
        assert torch.equal(got.embeddings[t], asset.embeddings[t])
    want = deltas(asset)
    want[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")] *= 0.5
    dg = deltas(got)
    assert sorted(dg) == sorted(want)
    assert all(torch.allclose(dg[k], want[k], atol=1e-6, rtol=1e-6) for k in want)
    assert got.lora_alpha == ALPHA


# -- pickles ------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this would create the marker file (the attack a weights_only load must stop)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "evil", "x": _Evil(marker)},
               folder / "evil.pt")
    assert not marker.exists()
    for src in (folder, folder / "evil.pt"):
        with pytest.raises(UnsafeFileError, match="refusing to load .*evil.pt.*weights_only=True"):
            import_asset(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a1111_pt_embedding_imports_with_weights_only(tmp_path):
    t = torch.randn(1, 32)
    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save({"string_to_param": {"*": t}, "string_to_token": {"*": 265}, "name": "whatever", "step": 500},
               folder / "style7.pt")
    got = fmt.load_asset(import_asset(folder, tmp_path / "out"))
    assert got.tokens == ["<style7>"] and torch.equal(got.embeddings["<style7>"], t[0]) and not got.has_lora
    assert got.card["imported"]["format"] == "a1111"


def test_refusals(tmp_path):
    # multi-vector embeddings are read (tests/test_sdxl_assets.py); more than 16 vectors is not an embedding
    with pytest.raises(ValueError, match="1 to 16 vectors"):
        torch.save({"string_to_param": {"*": torch.zeros(17, 32)}, "name": "m"}, tmp_path / "multi.pt")
        import_asset(tmp_path / "multi.pt", tmp_path / "o1")
    lora_only = tmp_path / "lora.safetensors"
    lora_only.write_bytes(fmt.safetensors_bytes({"lora_unet_x_to_q.lora_down.weight": torch.zeros(2, 4),
                                                 "lora_unet_x_to_q.lora_up.weight": torch.zeros(4, 2)}))
    with pytest.raises(ValueError, match="no pseudo-word embeddings"):
        import_asset(lora_only, tmp_path / "o2")
    with pytest.raises(ValueError, match="unknown export format"):
        ex.export_asset(fmt.Asset("a", ["<a>"], {}, {}, {"<a>": torch.zeros(4)}, {}, 0, 0.0), "comfy", tmp_path)


@pytest.mark.parametrize("kind", ["diffusers", "a1111", "bundle"])
def test_asset_without_lora_round_trips(tmp_path, kind):
    emb = {"<a1>": torch.randn(32), "<b2>": torch.randn(32)}
    asset = fmt.Asset("plain", ["<b2>", "<a1>"], {"<a1>": "varied", "<b2>": "constant"}, {"<a1>": "x", "<b2>": "y"},
                      emb, {c: {} for c in fmt.COMPONENTS}, 0, 0.0)
    files = ex.export_asset(asset, kind, tmp_path / "exp")
    assert len(files) == (1 if kind == "bundle" else 2)
    got = fmt.load_asset(import_asset(files[0] if kind == "bundle" else tmp_path / "exp", tmp_path / "imp"))
    assert got.tokens == ["<b2>", "<a1>"] and not got.has_lora
    assert got.roles == asset.roles and got.init_words == asset.init_words
    assert all(torch.equal(got.embeddings[t], emb[t]) for t in emb)
