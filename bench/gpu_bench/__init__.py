"""The GPU benchmark of issue 7: caspec against the diffusers reference patterns, measured in one process.

What it is for: telling, on one CUDA card, how fast caspec does a concept library's work compared with
the way diffusers' example scripts do the same work, and how close to the card's matrix-multiply rate
it runs; and, at ``tiny`` sizes on the CPU, running the very same code inside the test suite
(``tests/test_bench_gpu.py``) so that it cannot rot between the (rare, short) sessions that have a GPU.
``bench/gpu.py`` is its command line (it puts ``bench/`` on ``sys.path`` and imports this package as
``gpu_bench``); ``scripts/device-bench`` runs that on the GPU machine.

Models are built with random weights (FLOPs and timings do not depend on weight values), so nothing
is downloaded. Size presets (:func:`preset`):

* ``sd15``: diffusers' ``UNet2DConditionModel()`` default config (``cross_attention_dim`` set to SD1.5's
  768, ``sample_size`` 64), the SD1.5 ``AutoencoderKL`` config (channels 128/256/512/512, 4 down/up
  blocks, 2 layers per block, 4 latent channels, scaling 0.18215), a CLIP ViT-L/14-shaped
  ``CLIPTextModel`` (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 49408, 77 positions),
  512x512 images;
* ``tiny``: caspec's embedded tiny configs (:mod:`caspec.models.tiny`) at 32x32, for the CPU.

The tokenizer is CLIP's real BPE, built as :mod:`caspec.models.tiny` builds it (``clip_vocab()``).
The models are built once (pristine copies kept on the CPU in fp32) and every measured run gets its
own fresh copies on the device, so runs never see each other's added tokens or LoRA adapters and a
run's peak memory counts exactly the modules it uses. Sections, each caspec against its reference,
every ratio computed from the numbers of the same run:

1. ``sdedit``: 8 variations of one root image (50 DDIM steps, strength 0.86, CFG 7.5), caspec's
   :func:`caspec.models.sampling.sdedit` (batch size as the edit step uses it) against diffusers'
   ``StableDiffusionImg2ImgPipeline`` built from the same UNet and text encoder, with a VAE in the
   same dtype (the reference pattern loads every component in one dtype; caspec keeps its VAE in fp32),
   ``safety_checker=None``, one CPU generator per candidate. Median wall time over the repeats.
2. ``train``: samples/s, step time, peak memory, counted FLOPs and losses of caspec's trainer
   (:func:`caspec.train.train_concept`, phase 1 alone and phase 2 alone, at each batch size) against
   :class:`ReferenceTI` (the pattern of diffusers' ``examples/textual_inversion/textual_inversion.py``)
   and :class:`ReferenceLoRA` (the pattern of ``examples/dreambooth/train_dreambooth_lora.py``),
   both re-implemented here. A run is ``warmup`` untimed steps, ``steps`` timed steps (wall clock from
   the end of the last warm-up step to the end of the last timed step, the device synchronised), then
   one more step under ``torch.utils.flop_counter.FlopCounterMode`` to count its FLOPs.
3. ``e2e``: one concept end to end as ``caspec run`` does it: a pipe for sampling, 8 SDEdit candidates,
   CLIP scores and caspec's select-clip decision (:func:`caspec.ops.select_clip.decide`), a fresh pipe,
   two-phase training at batch 4 (checkpoints and end-of-training previews at caspec's defaults), the
   asset written (and read back) in caspec's asset format. Run twice in the process: ``cold`` (first,
   before any other section, right after the models are built) and ``warm`` (last). With fewer steps
   than 1000 + 1000 the time of 1000 + 1000 is also projected from the run's own mean step times.
4. ``flops``: a measured matrix-multiply rate (bf16 on CUDA, fp32 on the CPU) and, per training row,
   the effective TFLOP/s of the step (counted FLOPs / step time) and its fraction of that rate.

Precision: on CUDA caspec's modules are in ``dtype`` (default bf16, the issue's target; VAE fp32)
with :class:`~caspec.train.TrainConfig`'s ``mixed_precision`` (default ``no``); the references follow
their scripts with ``--mixed_precision fp16``: fp16 frozen weights, fp32 trained parameters, fp16
autocast around the forward of every model the script hands to ``accelerator.prepare`` (outputs
converted to fp32, as accelerate does) and a GradScaler. On the CPU everything is fp32, without
autocast or GradScaler. Peak memory is ``torch.cuda.max_memory_allocated`` (None on the CPU).

Entry points: :func:`settings_for` (defaults per size), :func:`run_benchmark` (returns the report
dict; ``on_section`` sees it after every section, so a killed run still leaves its finished sections),
:func:`markdown` (the report as a table), :func:`fnum` (how every figure is printed).

Files (each one job; they import caspec lazily, inside functions, so that importing the package is cheap
and the run's timed imports are a cold start's):

* ``models.py``: the size presets and the random-weight models (fresh device copies per run);
* ``settings.py``: :class:`BenchSettings`, its checks, :func:`settings_for`;
* ``inputs.py``: the synthetic root image, edit prompts and seeds, training images, captions and words;
* ``measure.py``: device sync, freeing memory, peak memory, the median, :class:`~.measure.Probe` (step stamps,
  losses, counted FLOPs);
* ``reference.py``: the diffusers reference patterns (img2img, textual inversion, DreamBooth LoRA) and the
  timed reference training run;
* ``caspec_side.py``: caspec's ``sdedit`` call and the timed caspec training run;
* ``sections.py``: sections 1, 2 and 4, each side against the other, and their ratios;
* ``e2e.py``: section 3, one concept end to end;
* ``report.py``: the report's meta, failed parts, derived figures and the markdown;
* ``run.py``: :func:`run_benchmark`, the whole run.
"""
from __future__ import annotations

from .e2e import bench_e2e
from .inputs import edit_prompts, edit_seeds, make_items, make_root, make_words
from .models import PRESET_NAMES, Models, Preset, preset
from .reference import ReferenceLoRA, ReferenceTI
from .report import fmib, fnum, fratio, markdown
from .run import run_benchmark
from .sections import bench_matmul, bench_sdedit, bench_train
from .settings import SECTIONS, BenchSettings, settings_for

__all__ = ["PRESET_NAMES", "SECTIONS", "BenchSettings", "Models", "Preset", "ReferenceLoRA", "ReferenceTI",
           "bench_e2e", "bench_matmul", "bench_sdedit", "bench_train", "edit_prompts", "edit_seeds", "fmib", "fnum",
           "fratio", "make_items", "make_root", "make_words", "markdown", "preset", "run_benchmark", "settings_for"]
