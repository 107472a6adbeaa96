"""caspec's own DDIM loop (caspec.models.sampling) checked against diffusers' pipelines on `tiny`."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from caspec.models import sampling as S  # noqa: E402
from caspec.models.load import load_pipeline  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402

STEPS = 10




@pytest.fixture(scope="module")
def pipe(caspec_cache):
    return load_pipeline(ModelSpec(base="tiny", device="cpu"), Path("."))


def _components(pipe):
    return dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                scheduler=S._scheduler_copy(pipe), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def _maxdiff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


class CallCounter:
    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def source_image(pipe):
    return S.txt2img(pipe, ["a red robot"], [7], steps=STEPS, batch_size=1)[0]


# (a) txt2img equals diffusers' StableDiffusionPipeline fed the same seeded noise

def test_txt2img_matches_diffusers(pipe):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**_components(pipe))
    sd.set_progress_bar_config(disable=True)
    # one image: the same computation, so the same bytes
    mine = S.txt2img(pipe, ["a red cat"], [11], steps=STEPS, guidance_scale=7.5, negative_prompt="blurry",
                     batch_size=1)
    ref = sd("a red cat", latents=S.initial_noise(pipe, 11), num_inference_steps=STEPS, guidance_scale=7.5,
             negative_prompt="blurry", height=64, width=64).images
    assert mine[0].size == (64, 64) and mine[0].mode == "RGB"
    assert _maxdiff(mine[0], ref[0]) == 0
    # a batch of three: diffusers encodes the prompts as one batch, caspec each distinct prompt alone
    # (so batch composition cannot move an embedding); CPU GEMMs may then differ in the last bits
    prompts, seeds = ["a red cat", "a blue dog", "a red cat"], [1, 2, 3]
    mine = S.txt2img(pipe, prompts, seeds, steps=STEPS, guidance_scale=7.5, negative_prompt="", batch_size=3)
    lat = torch.cat([S.initial_noise(pipe, s) for s in seeds])
    ref = sd(prompts, latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64).images
    assert max(_maxdiff(a, b) for a, b in zip(mine, ref)) <= 1
    # given caspec's embeddings, the denoising loop gives the same latents bit for bit (decoding differs
    # only in that diffusers decodes the batch at once and caspec one image at a time)
    cond, uncond = S.encode_prompts(pipe, prompts, "", guidance_scale=7.5)
    ref = sd(prompt_embeds=cond.embeds, negative_prompt_embeds=uncond.embeds, latents=lat, num_inference_steps=STEPS,
             guidance_scale=7.5, height=64, width=64, output_type="latent").images
    sched = S._scheduler_copy(pipe)
    sched.set_timesteps(STEPS)
    latents = S._denoise(pipe, sched, lat * sched.init_noise_sigma, sched.timesteps, cond, uncond, 7.5, pad_to=3)
    assert torch.equal(latents, ref)
    assert [i.tobytes() for i in S.decode_latents(pipe, latents)] == [i.tobytes() for i in mine]


def test_encode_prompts_matches_diffusers(pipe):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**_components(pipe))
    cond, uncond = S.encode_prompts(pipe, ["a red cat"], "blurry", guidance_scale=7.5)
    ref_c, ref_u = sd.encode_prompt("a red cat", "cpu", 1, True, "blurry")
    assert torch.equal(cond.embeds, ref_c) and torch.equal(uncond.embeds, ref_u)
    assert cond.pooled is None  # SD 1.x: no pooled embedding


def test_initial_noise_is_the_seeds_own_cpu_generator(pipe):
    expected = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(5))
    assert torch.equal(S.initial_noise(pipe, 5), expected)
    assert S.initial_noise(pipe, 5, 128).shape == (1, 4, 64, 64)


# (b) sdedit at 0.86: 43 UNet calls at 50 steps, equal to diffusers' img2img fed the VAE-mean latents

def test_sdedit_runs_int_steps_times_strength_unet_calls(pipe, source_image):
    with CallCounter(pipe.unet) as counter:
        S.sdedit(pipe, [source_image], ["a green robot"], [3], strength=0.86, steps=50, guidance_scale=7.5,
                 batch_size=1)
    assert len(counter.calls) == int(50 * 0.86) == 43
    assert set(counter.calls) == {2}  # conditional + unconditional in one batch


def test_sdedit_timesteps_match_diffusers_get_timesteps(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline(**_components(pipe))
    i2i.scheduler.set_timesteps(50)
    ref, n = i2i.get_timesteps(50, 0.86, "cpu")
    sched = S._scheduler_copy(pipe)
    sched.set_timesteps(50)
    mine = S.sdedit_timesteps(sched, 50, 0.86)
    assert n == 43 and torch.equal(mine, ref)


def test_sdedit_matches_diffusers_img2img(pipe, source_image):
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline(**_components(pipe))
    i2i.set_progress_bar_config(disable=True)
    z = S.encode_image(pipe, source_image)  # mean latent x scaling factor: img2img takes 4-channel input as latents
    mine = S.sdedit(pipe, [source_image], ["a green robot"], [5], strength=0.5, steps=STEPS, guidance_scale=7.5,
                    negative_prompt="ugly", batch_size=1)
    ref = i2i("a green robot", image=z, strength=0.5, num_inference_steps=STEPS, guidance_scale=7.5,
              negative_prompt="ugly", generator=torch.Generator("cpu").manual_seed(5)).images
    assert _maxdiff(mine[0], ref[0]) == 0
    # several candidates: one CPU generator per candidate, like diffusers' generator list
    mine = S.sdedit(pipe, [source_image] * 2, ["a green robot"] * 2, [5, 6], strength=0.86, steps=STEPS,
                    guidance_scale=7.5, batch_size=2)
    ref = i2i(["a green robot"] * 2, image=torch.cat([z, z]), strength=0.86, num_inference_steps=STEPS,
              guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)]).images
    assert max(_maxdiff(a, b) for a, b in zip(mine, ref)) <= 1


def test_sdedit_encodes_each_distinct_source_once(pipe, source_image):
    other = source_image.transpose(0)  # a different image
    with CallCounter(pipe.vae.encoder) as counter:
        out = S.sdedit(pipe, [source_image, source_image, other, source_image], ["a", "b", "a", "a"], [1, 2, 3, 4],
                       strength=0.3, steps=STEPS, batch_size=4)
    assert len(counter.calls) == 2
    assert len(out) == 4


def test_sdedit_fits_other_sizes_and_rejects_zero_steps(pipe, source_image):
    big = source_image.resize((96, 80))
    assert S.sdedit(pipe, [big], ["x"], [1], strength=0.3, steps=STEPS, batch_size=1)[0].size == (64, 64)
    with pytest.raises(ValueError, match="no denoising step"):
        S.sdedit(pipe, [source_image], ["x"], [1], strength=0.05, steps=10)


def test_guidance_one_skips_the_unconditional_pass(pipe):
    cond, uncond = S.encode_prompts(pipe, ["a", "b"], "neg", guidance_scale=1.0)
    assert uncond is None and cond.shape == (2, 77, 32)
    cond2, uncond2 = S.encode_prompts(pipe, ["a", "b"], "neg", guidance_scale=7.5)
    assert torch.equal(cond.embeds, cond2.embeds) and torch.equal(uncond2.embeds[0], uncond2.embeds[1])
    with CallCounter(pipe.unet) as counter:
        S.txt2img(pipe, ["a", "b"], [1, 2], steps=3, guidance_scale=1.0, batch_size=2)
    assert counter.calls == [2, 2, 2]
    with CallCounter(pipe.unet) as counter:  # a short batch runs padded to the batch shape
        S.txt2img(pipe, ["a", "b", "c"], [1, 2, 3], steps=2, guidance_scale=7.5, batch_size=2)
    assert counter.calls == [4, 4, 4, 4]


# (c) batching: batches always run at the full batch shape (padded), so with a given batch size an
# image is the same bytes alone, in any batch and at any position; other batch sizes: within 1/255

def test_batching_and_batch_composition(pipe):
    prompts, seeds = ["a red cat", "a blue dog", "a tree", "a car"], [1, 2, 9, 4]
    alone = S.txt2img(pipe, ["a blue dog"], [2], steps=STEPS, batch_size=3)[0]
    batch = S.txt2img(pipe, prompts, seeds, steps=STEPS, batch_size=3)
    assert alone.tobytes() == batch[1].tobytes()
    moved = S.txt2img(pipe, prompts[2:] + prompts[:2], seeds[2:] + seeds[:2], steps=STEPS, batch_size=3)
    assert [i.tobytes() for i in moved] == [i.tobytes() for i in batch[2:] + batch[:2]]
    other_size = S.txt2img(pipe, prompts, seeds, steps=STEPS, batch_size=1)
    assert max(_maxdiff(a, b) for a, b in zip(other_size, batch)) <= 1


def test_padding_is_what_makes_batches_invariant(pipe, monkeypatch):
    """Without padding CPU GEMMs differ with the batch shape (report: within 1/255)."""
    monkeypatch.setattr(S, "PAD_BATCHES", False)
    alone = S.txt2img(pipe, ["a blue dog"], [2], steps=STEPS, batch_size=3)[0]
    batch = S.txt2img(pipe, ["a red cat", "a blue dog", "a tree"], [1, 2, 9], steps=STEPS, batch_size=3)
    assert _maxdiff(alone, batch[1]) <= 1


def test_sdedit_batching(pipe, source_image):
    alone = S.sdedit(pipe, [source_image], ["b"], [2], strength=0.6, steps=STEPS, batch_size=3)[0]
    batch = S.sdedit(pipe, [source_image] * 3, ["a", "b", "c"], [1, 2, 3], strength=0.6, steps=STEPS, batch_size=3)
    assert alone.tobytes() == batch[1].tobytes()


# (d) determinism, progress, no shared-state mutation

def test_deterministic_bytes_and_progress(pipe):
    calls = []
    state = torch.random.get_rng_state()
    timesteps_before = pipe.scheduler.timesteps.clone()
    a = S.txt2img(pipe, ["x"] * 3, [1, 2, 3], steps=STEPS, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    b = S.txt2img(pipe, ["x"] * 3, [1, 2, 3], steps=STEPS, batch_size=2)
    assert [i.tobytes() for i in a] == [i.tobytes() for i in b]
    assert calls == [(2, 3), (3, 3)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never used
    assert torch.equal(pipe.scheduler.timesteps, timesteps_before)
    assert a[0].tobytes() != a[1].tobytes()


def test_sdedit_deterministic_and_progress(pipe, source_image):
    calls = []
    a = S.sdedit(pipe, [source_image] * 3, ["x"] * 3, [1, 2, 3], strength=0.5, steps=STEPS, batch_size=2,
                 progress=lambda d, t: calls.append((d, t)))
    b = S.sdedit(pipe, [source_image] * 3, ["x"] * 3, [1, 2, 3], strength=0.5, steps=STEPS, batch_size=2)
    assert [i.tobytes() for i in a] == [i.tobytes() for i in b]
    assert calls == [(2, 3), (3, 3)]
