"""SDXL (`tiny-xl`) and SD 2.x (`tiny-v`): caspec's sampling against diffusers' own pipelines, and model families."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from caspec.errors import ModelError  # noqa: E402
from caspec.models import sampling as S  # noqa: E402
from caspec.families import folder_family  # noqa: E402
from caspec.models.load import load_pipeline, model_family, model_identity  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def xl(caspec_cache):
    return load_pipeline(ModelSpec(base="tiny-xl", device="cpu"), Path("."))


@pytest.fixture(scope="module")
def v(caspec_cache):
    return load_pipeline(ModelSpec(base="tiny-v", device="cpu"), Path("."))


def _xl_components(pipe):
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
                scheduler=S._scheduler_copy(pipe), force_zeros_for_empty_prompt=True)


def _maxdiff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_families_of_the_embedded_models(xl, v):
    assert (xl.family, v.family) == ("sdxl", "sd2")
    assert xl.text_encoder.config.hidden_size == 32 and xl.text_encoder_2.config.hidden_size == 48
    assert xl.unet.config.addition_embed_type == "text_time" and xl.unet.config.cross_attention_dim == 80
    assert v.scheduler.config.prediction_type == "v_prediction" and v.tokenizer.pad_token == "!"
    assert model_family(ModelSpec(base="tiny"), Path(".")) == "sd1"
    # distinct weights, distinct identities (so distinct cache keys)
    ids = [model_identity(ModelSpec(base=b), Path(".")) for b in ("tiny", "tiny-xl", "tiny-v")]
    assert len({json.dumps(i, sort_keys=True) for i in ids}) == 3


def test_sdxl_encode_prompts_matches_diffusers(xl):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline(**_xl_components(xl))
    cond, uncond = S.encode_prompts(xl, ["a red cat"], "blurry", guidance_scale=7.5)
    rc, ru, rpc, rpu = ref.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=True,
                                         negative_prompt="blurry")
    assert cond.embeds.shape == (1, 77, 80) and cond.pooled.shape == (1, 48)
    assert torch.equal(cond.embeds, rc) and torch.equal(uncond.embeds, ru)
    assert torch.equal(cond.pooled, rpc) and torch.equal(uncond.pooled, rpu)
    # an empty negative prompt is zeros (force_zeros_for_empty_prompt), as diffusers does without one
    _, zero = S.encode_prompts(xl, ["a red cat"], "", guidance_scale=7.5)
    _, rz, _, rpz = ref.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(zero.embeds, rz) and torch.equal(zero.pooled, rpz) and not zero.embeds.any()


def test_sdxl_txt2img_matches_diffusers(xl):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline(**_xl_components(xl))
    ref.set_progress_bar_config(disable=True)
    mine = S.txt2img(xl, ["a red cat"], [11], steps=STEPS, guidance_scale=7.5, negative_prompt="blurry",
                     batch_size=1)
    out = ref("a red cat", latents=S.initial_noise(xl, 11), num_inference_steps=STEPS, guidance_scale=7.5,
              negative_prompt="blurry", height=64, width=64).images
    assert _maxdiff(mine[0], out[0]) == 0
    mine = S.txt2img(xl, ["a blue dog"], [3], steps=STEPS, guidance_scale=5.0, negative_prompt="", batch_size=1)
    out = ref("a blue dog", latents=S.initial_noise(xl, 3), num_inference_steps=STEPS, guidance_scale=5.0,
              height=64, width=64).images
    assert _maxdiff(mine[0], out[0]) == 0


def test_sdxl_sdedit_matches_diffusers_img2img(xl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    src = S.txt2img(xl, ["a red robot"], [7], steps=STEPS, batch_size=1)[0]
    i2i = StableDiffusionXLImg2ImgPipeline(**_xl_components(xl), requires_aesthetics_score=False)
    i2i.set_progress_bar_config(disable=True)
    z = S.encode_image(xl, src)
    mine = S.sdedit(xl, [src], ["a green robot"], [5], strength=0.86, steps=STEPS * 2, guidance_scale=7.5,
                    negative_prompt="ugly", batch_size=1)
    # img2img treats a 4-channel input as latents; its time ids take the size from them (64 px here)
    ref = i2i("a green robot", image=z, strength=0.86, num_inference_steps=STEPS * 2, guidance_scale=7.5,
              negative_prompt="ugly", generator=torch.Generator("cpu").manual_seed(5)).images
    assert _maxdiff(mine[0], ref[0]) == 0


def test_sd2_v_prediction_txt2img_and_sdedit_match_diffusers(v):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    comps = dict(vae=v.vae, text_encoder=v.text_encoder, tokenizer=v.tokenizer, unet=v.unet,
                 scheduler=S._scheduler_copy(v), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    sd = StableDiffusionPipeline(**comps)
    sd.set_progress_bar_config(disable=True)
    assert sd.scheduler.config.prediction_type == "v_prediction"
    mine = S.txt2img(v, ["a red cat"], [11], steps=STEPS, guidance_scale=7.5, batch_size=1)
    ref = sd("a red cat", latents=S.initial_noise(v, 11), num_inference_steps=STEPS, guidance_scale=7.5,
             height=64, width=64).images
    assert _maxdiff(mine[0], ref[0]) == 0
    i2i = StableDiffusionImg2ImgPipeline(**comps)
    i2i.set_progress_bar_config(disable=True)
    z = S.encode_image(v, mine[0])
    edit = S.sdedit(v, [mine[0]], ["a green cat"], [5], strength=0.86, steps=STEPS * 2, guidance_scale=7.5,
                    batch_size=1)
    ref = i2i("a green cat", image=z, strength=0.86, num_inference_steps=STEPS * 2, guidance_scale=7.5,
              generator=torch.Generator("cpu").manual_seed(5)).images
    assert _maxdiff(edit[0], ref[0]) == 0


def test_unsupported_layouts_are_refused_by_name(tmp_path):
    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelError, match=r"SD 3\.x family \(StableDiffusion3Pipeline\), which is not supported yet.*"
                                         r"SD 1.x, SD 2.x, SDXL and FLUX.1"):
        folder_family(sd3)
    refiner = tmp_path / "refiner"
    for sub in ("unet", "vae", "text_encoder_2", "tokenizer_2"):
        (refiner / sub).mkdir(parents=True)
    (refiner / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True}))
    with pytest.raises(ModelError, match="refiner"):
        folder_family(refiner)
    with pytest.raises(ModelError, match="refiner"):
        model_identity(ModelSpec(base=str(refiner)), tmp_path)
    sd2 = tmp_path / "sd2"
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        (sd2 / sub).mkdir(parents=True)
    (sd2 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    assert folder_family(sd2) == "sd2"
