"""The embedded FLUX.1-shaped `tiny-flux` models (caspec.models.tiny_flux) and caspec's own flow-matching
sampling (caspec.models.flow_sampling), checked bit for bit against diffusers' Flux pipelines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from caspec.models import flow_sampling as F  # noqa: E402
from caspec.models import tiny_flux as TF  # noqa: E402
from caspec.models.prompts import PromptTooLong  # noqa: E402

RES = 64


def _maxdiff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _load(name: str):
    from diffusers import FluxPipeline

    fp = FluxPipeline.from_pretrained(TF.ensure_tiny_flux(name), local_files_only=True)
    fp.set_progress_bar_config(disable=True)
    return fp


def _ns(fp) -> types.SimpleNamespace:
    """What caspec's Pipe carries, built from a loaded FluxPipeline's components."""
    return types.SimpleNamespace(tokenizer=fp.tokenizer, text_encoder=fp.text_encoder, tokenizer_2=fp.tokenizer_2,
                                 text_encoder_2=fp.text_encoder_2, transformer=fp.transformer, vae=fp.vae,
                                 scheduler=type(fp.scheduler).from_config(fp.scheduler.config),
                                 device=torch.device("cpu"), dtype=torch.float32,
                                 resolution=RES)


@pytest.fixture(scope="module")
def dev(caspec_cache):
    fp = _load("tiny-flux")
    return fp, _ns(fp)


@pytest.fixture(scope="module")
def schnell(caspec_cache):
    fp = _load("tiny-flux-schnell")
    return fp, _ns(fp)


@pytest.fixture(scope="module")
def source(dev):
    return F.txt2img(dev[1], ["a photo of a red robot"], [5], steps=4, batch_size=1)[0]


# -- tiny-flux ----------------------------------------------------------------------------------


def test_tiny_flux_identity_is_pure_stable_and_names_the_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("CASPEC_CACHE", str(tmp_path / "cache"))
    a, b = TF.tiny_flux_identity("tiny-flux"), TF.tiny_flux_identity("tiny-flux-schnell")
    assert a == TF.tiny_flux_identity("tiny-flux") and json.loads(json.dumps(a)) == a
    assert a != b and a["family"] == b["family"] == "flux"
    assert a["transformer"]["guidance_embeds"] and not b["transformer"]["guidance_embeds"]
    assert a["scheduler"]["use_dynamic_shifting"] and not b["scheduler"]["use_dynamic_shifting"]
    assert a["torch"] != "unknown" and a["diffusers"] != "unknown" and a["transformers"] != "unknown"
    assert TF.tiny_flux_dir("tiny-flux") == tmp_path / "cache" / "models" / f"tiny-flux-v{TF.TINY_FLUX_VERSION}"
    assert not (tmp_path / "cache").exists()  # builds nothing
    code = ("import sys; from caspec.models.tiny_flux import tiny_flux_identity as f; f('tiny-flux'); "
            "f('tiny-flux-schnell'); sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "tiny_flux_identity imported torch"


def test_tiny_flux_builds_once_and_loads_offline(dev, schnell, caspec_cache):
    fp, _ = dev
    folder = TF.ensure_tiny_flux("tiny-flux")
    assert folder == caspec_cache / "models" / f"tiny-flux-v{TF.TINY_FLUX_VERSION}"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "T5EncoderModel"
    stored = json.loads((folder / "caspec-tiny.json").read_text())
    assert stored == json.loads(json.dumps(TF.tiny_flux_identity("tiny-flux"))) and stored["family"] == "flux"
    stamp = (folder / "transformer/diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert TF.ensure_tiny_flux("tiny-flux") == folder  # complete: not rebuilt
    assert (folder / "transformer/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp

    # FLUX.1's shapes in miniature
    assert fp.vae.config.latent_channels == 16 and fp.transformer.config.in_channels == 64
    assert (fp.vae.config.scaling_factor, fp.vae.config.shift_factor) == (0.3611, 0.1159)
    assert F.vae_scale_factor(fp) == 2 and F.image_seq_len(RES, 2) == 256
    assert fp.tokenizer.model_max_length == 77 and fp.tokenizer_2.model_max_length == 512
    assert fp.transformer.config.guidance_embeds and not schnell[0].transformer.config.guidance_embeds
    assert fp.scheduler.config.use_dynamic_shifting and schnell[0].scheduler.config.shift == 1.0

    # the T5 tokenizer built in memory survives save_pretrained / from_pretrained
    mem = TF.t5_tokenizer()
    assert (fp.tokenizer_2.pad_token_id, fp.tokenizer_2.eos_token_id, fp.tokenizer_2.unk_token_id) == (0, 1, 2)
    for text in ["a photo of a dancing robot", "Zebra-striped CUBE, 42 times!", "qwxz é"]:
        ids = mem(text).input_ids
        assert fp.tokenizer_2(text).input_ids == ids and ids[-1] == 1
    assert mem("qwxz").input_ids.count(2) == 0  # any ASCII word tokenizes (characters), no <unk>

    # the stock pipeline runs it: 2 steps at 64 px
    image = fp("a photo of a cat", num_inference_steps=2, height=RES, width=RES, generator=_gen(0)).images[0]
    assert image.size == (RES, RES) and np.asarray(image).std() > 0


def test_tiny_flux_builds_the_same_bytes(schnell, tmp_path):
    TF.build_tiny_flux(tmp_path / "again", "tiny-flux-schnell")
    folder = TF.ensure_tiny_flux("tiny-flux-schnell")
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json", "caspec-tiny.json"):
        assert (tmp_path / "again" / rel).read_bytes() == (folder / rel).read_bytes(), rel


# -- txt2img ------------------------------------------------------------------------------------


def test_encode_prompts_matches_flux_pipeline(dev):
    fp, pipe = dev
    pooled, embeds, ids = F.encode_prompts(pipe, ["a red robot"])
    with torch.no_grad():  # as the pipelines' __call__ runs it
        ref_embeds, ref_pooled, ref_ids = fp.encode_prompt("a red robot", device="cpu")
    assert pooled.shape == (1, 32) and embeds.shape == (1, 512, 32) and ids.shape == (512, 3)
    assert torch.equal(pooled, ref_pooled) and torch.equal(embeds, ref_embeds) and torch.equal(ids, ref_ids)


def test_txt2img_matches_flux_pipeline_dev(dev):
    fp, pipe = dev
    mine = F.txt2img(pipe, ["a photo of a red robot"], [5], steps=4, guidance=3.5, batch_size=1)[0]
    ref = fp("a photo of a red robot", generator=_gen(5), num_inference_steps=4, guidance_scale=3.5,
             height=RES, width=RES).images[0]
    assert mine.size == (RES, RES) and mine.mode == "RGB"
    assert _maxdiff(mine, ref) == 0
    # the same noise handed in as latents (what FluxPipeline draws from the generator, packed)
    lat = F.pack_latents(F.initial_noise(pipe, 5))
    ref = fp("a photo of a red robot", latents=lat, num_inference_steps=4, guidance_scale=3.5,
             height=RES, width=RES).images[0]
    assert _maxdiff(mine, ref) == 0
    # the guidance embedding is in use
    other = F.txt2img(pipe, ["a photo of a red robot"], [5], steps=4, guidance=1.0, batch_size=1)[0]
    assert _maxdiff(mine, other) > 0
    assert pipe.scheduler.begin_index is None  # the template was never touched


def test_txt2img_matches_flux_pipeline_schnell(schnell):
    fp, pipe = schnell
    mine = F.txt2img(pipe, ["a photo of a blue dog"], [11], steps=4, guidance=None, batch_size=1)[0]
    ref = fp("a photo of a blue dog", generator=_gen(11), num_inference_steps=4, height=RES, width=RES).images[0]
    assert _maxdiff(mine, ref) == 0
    # no guidance embedding: the value is ignored
    assert _maxdiff(mine, F.txt2img(pipe, ["a photo of a blue dog"], [11], steps=4, guidance=7.0, batch_size=1)[0]) == 0


def test_txt2img_true_cfg_matches_flux_pipeline(dev):
    fp, pipe = dev
    kw = dict(steps=4, guidance=3.5, true_cfg_scale=4.0, negative_prompt="blurry", batch_size=1)
    mine = F.txt2img(pipe, ["a photo of a red robot"], [5], **kw)[0]
    ref = fp("a photo of a red robot", negative_prompt="blurry", true_cfg_scale=4.0, generator=_gen(5),
             num_inference_steps=4, guidance_scale=3.5, height=RES, width=RES).images[0]
    assert _maxdiff(mine, ref) == 0
    plain = F.txt2img(pipe, ["a photo of a red robot"], [5], steps=4, guidance=3.5, batch_size=1)[0]
    assert _maxdiff(mine, plain) > 0
    # a negative prompt without true_cfg_scale > 1 changes nothing (as in the pipeline)
    same = F.txt2img(pipe, ["a photo of a red robot"], [5], steps=4, guidance=3.5, negative_prompt="blurry",
                     batch_size=1)[0]
    assert _maxdiff(same, plain) == 0


# -- SDEdit -------------------------------------------------------------------------------------


def test_sdedit_matches_flux_img2img(dev, source, monkeypatch):
    """caspec encodes sources deterministically (the posterior's mode); the stock img2img pipeline samples
    the posterior with the call's generator (then draws the noise from the same generator). With its
    encode switched to the mode (``sample_mode="argmax"``, as FluxKontextPipeline encodes), it equals
    caspec bit for bit."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as i2i_module
    from diffusers import FluxImg2ImgPipeline

    fp, pipe = dev
    i2i = FluxImg2ImgPipeline.from_pipe(fp)
    i2i.set_progress_bar_config(disable=True)
    mine = F.sdedit(pipe, [source], ["a photo of a blue cat"], [9], strength=0.6, steps=6, guidance=3.5,
                    batch_size=1)[0]
    call = dict(image=source, strength=0.6, num_inference_steps=6, guidance_scale=3.5, height=RES, width=RES)
    stock = i2i("a photo of a blue cat", generator=_gen(9), **call).images[0]
    assert _maxdiff(mine, stock) > 0  # a sampled encode, and the noise is the generator's second draw
    orig = i2i_module.retrieve_latents
    monkeypatch.setattr(i2i_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": orig(out, generator, "argmax"))
    ref = i2i("a photo of a blue cat", generator=_gen(9), **call).images[0]
    assert _maxdiff(mine, ref) == 0
    assert _maxdiff(mine, source) > 0


def test_sdedit_start_matches_the_img2img_pipeline(dev, schnell):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_timesteps

    assert F.calculate_shift(256) == calculate_shift(256) and F.calculate_shift(4096) == calculate_shift(4096)
    for fp, _ in (dev, schnell):
        i2i_sched = type(fp.scheduler).from_config(fp.scheduler.config)
        for steps, strength in [(6, 0.6), (28, 0.86), (10, 0.3), (4, 0.5), (50, 0.99)]:
            seq = F.image_seq_len(RES, 2)
            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
            retrieve_timesteps(i2i_sched, steps, "cpu", sigmas=sigmas, mu=mu)
            holder = types.SimpleNamespace(scheduler=i2i_sched)
            from diffusers import FluxImg2ImgPipeline

            timesteps, left = FluxImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
            start = i2i_sched.begin_index
            want = (start, float(i2i_sched.sigmas[start]))
            if want[1] >= 1.0:
                with pytest.raises(ValueError, match="pure noise"):
                    F.sdedit_start(fp, steps, strength, RES)
                continue
            assert F.sdedit_start(fp, steps, strength, RES) == want
            assert F.sdedit_start(dict(fp.scheduler.config), steps, strength, RES, vae_scale_factor=2) == want
            assert len(timesteps) == left == steps - start
    # FLUX.1's own numbers (VAE factor 8), from the config alone: dev at 512 and 1024 px, 28 steps, 0.86
    assert F.sdedit_start(TF.SCHEDULER_DEV, 28, 0.86, 512)[1] == pytest.approx(0.940, abs=5e-4)
    assert F.sdedit_start(TF.SCHEDULER_DEV, 28, 0.86, 1024)[1] == pytest.approx(0.963, abs=5e-4)
    # schnell at 4 steps and 0.86 starts from pure noise: the source image would be discarded
    with pytest.raises(ValueError, match="pure noise"):
        F.sdedit_start(TF.SCHEDULER_SCHNELL, 4, 0.86, 1024)
    with pytest.raises(ValueError, match="pure noise"):
        F.sdedit(schnell[1], [None], ["x"], [1], strength=0.86, steps=4)
    with pytest.raises(ValueError, match="strength"):
        F.sdedit_start(TF.SCHEDULER_DEV, 4, 0.0, 1024)


# -- Kontext ------------------------------------------------------------------------------------


def test_instruct_edit_matches_flux_kontext(dev, source):
    from diffusers import FluxKontextPipeline

    fp, pipe = dev
    kx = FluxKontextPipeline.from_pipe(fp)
    kx.set_progress_bar_config(disable=True)
    mine = F.instruct_edit(pipe, [source], ["make it blue"], [3], steps=4, guidance=2.5, auto_resize=False,
                           batch_size=1)[0]
    ref = kx(image=source, prompt="make it blue", generator=_gen(3), num_inference_steps=4, guidance_scale=2.5,
             height=RES, width=RES, max_area=RES * RES, _auto_resize=False).images[0]
    assert _maxdiff(mine, ref) == 0
    # the reference image is in use
    other = F.instruct_edit(pipe, [source.rotate(90)], ["make it blue"], [3], steps=4, guidance=2.5,
                            auto_resize=False, batch_size=1)[0]
    assert _maxdiff(mine, other) > 0
    # true CFG as the pipeline does it
    mine = F.instruct_edit(pipe, [source], ["make it blue"], [3], steps=2, true_cfg_scale=3.0, negative_prompt="red",
                           auto_resize=False, batch_size=1)[0]
    ref = kx(image=source, prompt="make it blue", negative_prompt="red", true_cfg_scale=3.0, generator=_gen(3),
             num_inference_steps=2, height=RES, width=RES, max_area=RES * RES, _auto_resize=False).images[0]
    assert _maxdiff(mine, ref) == 0


def test_kontext_reference_size_follows_the_pipeline():
    assert F.kontext_reference_size(64, 64, auto_resize=False, multiple_of=4) == (64, 64)
    assert F.kontext_reference_size(64, 64, auto_resize=True) == (1024, 1024)
    assert F.kontext_reference_size(1500, 1000, auto_resize=True) == (1248, 832)
    assert F.kontext_reference_size(1000, 1500, auto_resize=True) == (832, 1248)


# -- batching and checks ------------------------------------------------------------------------


def test_an_image_is_the_same_alone_and_in_a_batch(dev, source):
    _, pipe = dev
    alone = F.txt2img(pipe, ["a red cat"], [1], steps=2, batch_size=4)[0]
    batch = F.txt2img(pipe, ["a dog", "a red cat", "a tree"], [7, 1, 8], steps=2, batch_size=4)
    assert _maxdiff(alone, batch[1]) == 0 and _maxdiff(batch[0], batch[1]) > 0
    assert _maxdiff(alone, F.txt2img(pipe, ["a red cat"], [1], steps=2, batch_size=1)[0]) <= 1

    alone = F.sdedit(pipe, [source], ["a blue cat"], [4], strength=0.6, steps=4, batch_size=4)[0]
    batch = F.sdedit(pipe, [source.rotate(90), source, source], ["a dog", "a blue cat", "a tree"], [2, 4, 6],
                     strength=0.6, steps=4, batch_size=4)
    assert _maxdiff(alone, batch[1]) == 0

    alone = F.instruct_edit(pipe, [source], ["make it blue"], [4], steps=2, auto_resize=False, batch_size=4)[0]
    batch = F.instruct_edit(pipe, [source.rotate(90), source, source], ["make it red", "make it blue", "x"],
                            [2, 4, 6], steps=2, auto_resize=False, batch_size=4)
    assert _maxdiff(alone, batch[1]) == 0


def test_progress_and_repeatable_bytes(dev):
    _, pipe = dev
    seen = []
    first = F.txt2img(pipe, ["a", "b", "c"], [1, 2, 3], steps=1, batch_size=2,
                      progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 3), (3, 3)]
    again = F.txt2img(pipe, ["a", "b", "c"], [1, 2, 3], steps=1, batch_size=2)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]


def test_checks_resolution_lengths_and_prompt_length(dev):
    _, pipe = dev
    with pytest.raises(ValueError, match="multiple of 4"):
        F.txt2img(pipe, ["a cat"], [1], steps=1, resolution=66)
    with pytest.raises(ValueError, match="as many"):
        F.txt2img(pipe, ["a cat", "a dog"], [1], steps=1)
    with pytest.raises(PromptTooLong, match="T5"):
        F.txt2img(pipe, ["a photo of a red robot dancing in the city"], [1], steps=1, max_sequence_length=8)
