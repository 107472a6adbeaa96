"""The spec's schema (version 1) as pydantic v2 models.

A spec has sections, one per step kind, each a mapping from step id to that kind's settings:
``roots`` (generate or a given image), ``edits`` (SDEdit variations), ``select`` (keep some
candidates). Later kinds (train, compose, export, eval) join as new sections. Every model
forbids unknown fields so that typos surface as errors with a did-you-mean hint.

These models describe what the user wrote after templating; they hold no file positions
(``spec.load`` maps validation errors back to FILE:LINE:COL).
"""
from __future__ import annotations

from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

SPEC_VERSION = 1

StepId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
VarValue = Union[str, int, float, bool, list[Union[str, int, float, bool]]]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelSpec(_Model):
    """Which diffusion model runs the steps: ``tiny`` (embedded), a local diffusers folder, or a hub id."""

    base: str = Field("tiny", min_length=1, description="`toy` (embedded, trained on the shapes world), `tiny` (embedded, random weights; `tiny-xl` SDXL-shaped, `tiny-v` SD 2.x-shaped with v-prediction, `tiny-flux` FLUX.1-dev-shaped, `tiny-flux-schnell`), a local diffusers folder (SD 1.x, SD 2.x, SDXL or FLUX.1), or a hub id such as `black-forest-labs/FLUX.1-dev`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit). Resolved to a commit from the local cache so the cache key never follows a moving name.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="Weight dtype: `auto` is fp16 on CUDA and fp32 on CPU; the VAE always runs in fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run: `auto` picks CUDA when available.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"base": value} if isinstance(value, str) else value


class Sampling(_Model):
    """Sampling settings shared by every step that runs the diffusion model; any may be overridden per step."""

    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Base seed; per-image seeds are derived from it.")
    steps: int | None = Field(None, ge=1, le=1000, description="DDIM steps for a full denoise (SDEdit runs `int(steps*strength)` of them).")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="Classifier-free guidance scale (1 disables the unconditional pass); on FLUX.1 the distilled guidance the model embeds.")
    true_cfg_scale: float | None = Field(None, ge=1, le=100, description="FLUX.1 only: true classifier-free guidance against `negative_prompt`, with a second transformer pass (1 or unset: off).")
    resolution: int | None = Field(None, ge=16, le=4096, multiple_of=8, description="Square image size in pixels; default: the model's native size (64 for `tiny`, 512 for SD 1.x).")
    negative_prompt: str | None = Field(None, description="Text to guide away from (replaces the empty unconditional prompt).")


class Defaults(Sampling):
    """Spec-wide defaults. Unset, steps and guidance are the model family's: the paper's DDIM, 50 steps and
    guidance 7.5 on SD 1.x, SD 2.x and SDXL; flow-matching Euler, 28 steps and guidance 3.5 on FLUX.1."""

    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str = ""
    scheduler: Literal["ddim", "flow-euler"] | None = Field(None, description="Sampler: the family's own (`ddim` for SD 1.x/2.x/SDXL, what the paper uses, deterministic, eta 0; `flow-euler` for FLUX.1). Naming another family's is an error.")


class RootStep(Sampling):
    """A root image: generated from a seed prompt (txt2img), or a user-provided image file."""

    prompt: str | None = Field(None, min_length=1, description="Seed prompt for txt2img.")
    image: str | None = Field(None, min_length=1, description="Path of a user-provided root image, relative to the spec file.")
    candidates: int = Field(4, ge=1, le=1024, description="How many images to generate from the prompt.")

    @model_validator(mode="after")
    def _prompt_xor_image(self) -> "RootStep":
        if (self.prompt is None) == (self.image is None):
            raise ValueError("a root needs exactly one of `prompt` (generate) or `image` (a given file)")
        if self.image is not None and "candidates" in self.model_fields_set:
            raise ValueError("`candidates` applies to generated roots only; a root `image` is one image")
        return self


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class EditStep(Sampling):
    """Variations of a step's images: SDEdit (noise each source image to `strength` or `noise_level`, then denoise
    guided by each edit prompt) or instruction edits (`method: instruct`, a FLUX.1 Kontext model)."""

    method: Literal["sdedit", "instruct"] = Field("sdedit", description="`sdedit` (the paper: text-guided SDEdit) or `instruct` (instruction edits such as `make the robot purple`, run as FluxKontextPipeline does; needs a Kontext `model:`).")
    model: ModelSpec | None = Field(None, description="A model for this step only (e.g. a FLUX.1 Kontext model editing for an SDXL training); it enters only this step's key. Default: the spec's `model`.")
    noise_level: float | None = Field(None, gt=0, le=1, description="SDEdit start as a noise level matched by signal-to-noise ratio, the same on every family: T means the noise SD 1.x has at timestep T x 1000 (the paper's 0.86). Replaces `strength`, which keeps diffusers' meaning (a far noisier start on FLUX.1).")
    shows: list[Annotated[str, Field(min_length=1)]] | None = Field(None, description="`method: instruct`: what each instruction's result should show (`a purple robot` for `make the robot purple`), one per prompt; CLIP selection scores candidates against it.")

    from_: StepId = Field(alias="from", description="Id of the root or select step whose images are edited.")
    pick: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="Indices of the source's images to edit (default: all).")
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="Edit prompts; a template over a list var expands into one prompt per value.")
    strength: float = Field(0.86, gt=0, le=1, description="How far to noise the source: 0.86 (the paper) starts 43 of 50 DDIM steps from the end.")
    candidates: int = Field(4, ge=1, le=1024, description="Candidates per edit prompt.")

    @field_validator("prompts", "shows", mode="before")
    @classmethod
    def _prompts_list(cls, value: Any) -> Any:
        return _as_list(value)

    @model_validator(mode="after")
    def _start(self) -> "EditStep":
        if self.noise_level is not None and "strength" in self.model_fields_set:
            raise ValueError("give `strength` (diffusers' meaning) or `noise_level` (matched across families), not both")
        if self.method == "instruct" and ({"strength", "noise_level"} & self.model_fields_set):
            raise ValueError("`method: instruct` edits from noise with the image as a reference: "
                             "`strength` and `noise_level` do not apply")
        if self.shows is not None and len(self.shows) != len(self.prompts):
            raise ValueError(f"`shows` needs one text per prompt ({len(self.prompts)}), got {len(self.shows)}")
        return self

    @field_validator("pick", mode="before")
    @classmethod
    def _pick_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value


TOY_CLIP_MODEL = "caspec-toy-clip"
TINY_CLIP_MODEL = "caspec-tiny-clip"
DEFAULT_CLIP = {"toy": TOY_CLIP_MODEL, "tiny": TINY_CLIP_MODEL, "tiny-xl": TINY_CLIP_MODEL, "tiny-v": TINY_CLIP_MODEL,
                "tiny-flux": TINY_CLIP_MODEL, "tiny-flux-schnell": TINY_CLIP_MODEL}
"""CLIP model of `select: by: clip` and `eval` when none is named, per embedded diffusion model (others: ViT-B-32)."""
_CLIP_MODEL_HELP = ("open_clip model name; default `ViT-B-32`, or with the embedded models `caspec-toy-clip` (`model: toy`; "
                    "shipped, trained on the shapes world) and `caspec-tiny-clip` (`model: tiny`; random weights, for "
                    "offline tests).")
_PRETRAINED_HELP = ("open_clip pretrained tag, e.g. `laion2b_s34b_b79k`: its weights must be in the local Hugging Face "
                    "cache (caspec never downloads). `random`: random weights (meaningless scores; outputs say so). "
                    "With a model other than `tiny`/`toy`, a CLIP without `pretrained` or `checkpoint` is an error.")


class ClipSelect(_Model):
    """Automatic selection by CLIP scores, standing in for the person (for CI and batch production)."""

    model: str = Field("ViT-B-32", min_length=1, description=_CLIP_MODEL_HELP)
    pretrained: str | None = Field(None, min_length=1, description=_PRETRAINED_HELP)
    checkpoint: str | None = Field(None, min_length=1, description="Local CLIP checkpoint file, relative to the spec (hashed into the key).")
    min_direction: float | None = Field(0.0, ge=-1, le=1, description="Edit candidates: keep only those whose CLIP directional similarity (the image's change from its source against the text's change from the source's prompt) exceeds this (does the asked-for change show?). Default 0: the image moved towards the edit, not away. `null` turns it off.")
    min_relative_direction: float | None = Field(0.6, ge=0, le=1, description="Edit candidates: keep only those whose directional similarity is at least this fraction of the best among the candidates of the same source image (the score normalised within a source: an edit that barely shows loses to those that show). `null` turns it off.")
    min_text: float | None = Field(None, ge=-1, le=1, description="Keep only candidates whose CLIP text-image similarity to their own prompt is at least this (does the prompt show?).")
    min_identity: float | None = Field(None, ge=-1, le=1, description="Keep only candidates whose image-image similarity to their source image is at least this (is the rest preserved?).")
    max_identity: float | None = Field(None, ge=-1, le=1, description="Keep only candidates at most this similar to their source (did anything change?).")
    max_duplicate: float | None = Field(None, ge=-1, le=1, description="Drop a candidate more similar than this to a better-ranked kept one (diversity).")
    top_k: int | None = Field(None, ge=1, description="Keep at most this many, best score first.")
    min_keep: int = Field(1, ge=0, description="Fail the step when fewer than this many pass (the message lists the best scores).")


class SelectStep(_Model):
    """Keep some candidates of a root or edit step: `manual` (a person marks them in a review manifest)
    or `clip` (CLIP-threshold filtering, its scores written to the same kind of manifest)."""

    from_: StepId = Field(alias="from", description="Id of the root or edit step whose candidates are reviewed.")
    by: Literal["manual", "clip"] = Field("manual", description="Who decides: `manual` (a person, in a review manifest) or `clip` (automatic).")
    count: int | None = Field(None, ge=1, description="Exactly this many must be kept (the paper keeps 8).")
    manifest: str | None = Field(None, description="Review manifest path, relative to the spec file. Default: `reviews/<spec-name>/<step-id>.yaml`.")
    clip: ClipSelect | None = Field(None, description="Settings of `by: clip`.")

    @model_validator(mode="after")
    def _clip_settings(self) -> "SelectStep":
        if self.by == "manual" and self.clip is not None:
            raise ValueError("`clip:` settings apply to `by: clip` only")
        return self


PSEUDO_WORD = r"^<[A-Za-z0-9_.-]*(\{k\})?[A-Za-z0-9_.-]*>$"
TOKEN = r"^<[A-Za-z0-9_.-]{1,62}>$"
"""The grammar of one concrete pseudo-word wherever it enters: a spec (after ``{k}``), an import, an asset header."""


def is_pseudo_word(token: object) -> bool:
    """Whether ``token`` follows :data:`TOKEN` (angle brackets around letters, digits, ``_``, ``.``, ``-``)."""
    import re

    return isinstance(token, str) and re.fullmatch(TOKEN, token) is not None


class PseudoWordSpec(_Model):
    """A pseudo-word: constant (`<dance1>`, shared by every image) or varied (`<robot{k}>`, one per image k)."""

    token: Annotated[str, StringConstraints(pattern=PSEUDO_WORD, min_length=3, max_length=64)] = Field(
        description="The pseudo-word, in angle brackets. `{k}` (1-based image index) makes it one word per image.")
    init: str = Field(min_length=1, description="An ordinary word whose embedding seeds the pseudo-word's (e.g. `dance`, `robot`).")
    vectors: int = Field(1, ge=1, le=16, description="Embedding vectors the word holds (A1111's `num_vectors_per_token`); 1 is the paper's setting. A word of N vectors takes N of the prompt's 75 token places.")

    @property
    def varied(self) -> bool:
        return "{k}" in self.token


class TrainSettings(_Model):
    """Two-phase training: multi-token textual inversion, then embeddings + LoRA (text encoder and UNet).
    Defaults are the paper's (1000 + 1000 steps)."""

    phase1_steps: int = Field(1000, ge=0, le=100_000, description="Steps training only the new embeddings.")
    phase2_steps: int = Field(1000, ge=0, le=100_000, description="Steps training embeddings jointly with LoRA.")
    phase2_embeddings: bool = Field(True, description="Keep training the embeddings in phase 2 (the paper); false trains only LoRA there (an ablation: with `phase1_steps: 0`, LoRA alone).")
    lr_embeddings: float = Field(5e-3, gt=0, le=1)
    lr_lora_unet: float = Field(1e-4, gt=0, le=1)
    lr_lora_text: float = Field(5e-5, gt=0, le=1)
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default: the rank (scale 1).")
    unet_targets: list[str] | None = Field(None, min_length=1, description="Denoiser modules that get LoRA (suffix "
                                           "match; Linear or Conv2d). Default: the family's (UNet attention `to_q`, "
                                           "`to_k`, `to_v`, `to_out.0`; add `conv1`, `conv2` for the ResNet "
                                           "convolutions; FLUX.1: diffusers' Flux transformer targets).")
    text_targets: list[str] | None = Field(None, min_length=1, description="Text-encoder modules that get LoRA "
                                           "(default: CLIP's `q_proj`, `k_proj`, `v_proj`, `out_proj`; FLUX.1's T5 "
                                           "gets none).")
    batch_size: int = Field(1, ge=1, le=64)
    grad_accum: int = Field(1, ge=1, le=64)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Default: the spec's seed.")
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting (e.g. 5.0); off by default.")
    timestep_sampling: Literal["uniform", "cubic"] = Field(
        "uniform", description="How training timesteps are drawn: `uniform` (the paper) or `cubic`, t = (1 - u^3) T, "
        "which favours high noise, where the layout is decided (79% of draws in the noisier half).")
    weight_decay: float = Field(1e-2, ge=0, le=1)
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint every N steps (0: never).")
    preview_every: int = Field(0, ge=0, description="Render previews every N steps (0: only at the end).")
    cache_latents: bool = Field(True, description="VAE-encode each image once rather than every step.")
    flip: bool = Field(False, description="Random horizontal flips (augmentation).")
    shift_px: int = Field(0, ge=0, le=256, description="Position augmentation: each training sample is translated by up to this many pixels in x and y (drawn per sample), the uncovered border filled with the image's background; the latents are cached per shift. For assets whose place is not the concept (a colour, a texture): it stops them pulling objects to where their training images had them. Refused for an asset whose words or caption are about place.")
    lora_window: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=2, max_length=2)] | Literal["auto"] | None = Field(None, description="The time window this asset's denoiser LoRA should act in when composed (`lora_windows: {asset: auto}`), kept in its card and exported model card: `[start, end]` in t/T, or `auto` (measured after training: the noise levels where the LoRA adds appearance rather than moving the layout).")
    shift_phases: Literal["both", "phase2"] = Field("both", description="Which phases shift their samples: `both`, or only `phase2` (the LoRA phase).")
    t5_lora: bool = Field(False, description="FLUX.1: phase 2 also puts LoRA on T5 (off by default, as diffusers' Flux scripts; diffusers' Flux loader cannot load a T5 LoRA, the `a1111`/`bundle` exports carry it as kohya's `lora_te3_`, which ComfyUI and Forge read).")

    @model_validator(mode="after")
    def _some_steps(self) -> "TrainSettings":
        if self.phase1_steps + self.phase2_steps < 1:
            raise ValueError("phase1_steps + phase2_steps must be at least 1")
        return self


class ConceptStep(_Model):
    """Train a concept asset from the images of a step: image k gets the caption with `{k}` = k."""

    from_: StepId = Field(alias="from", description="Id of the select (or root/edit) step whose images are learned, in order k = 1..N.")
    words: list[PseudoWordSpec] = Field(min_length=1, description="The pseudo-words with their initializer words.")
    caption: str | None = Field(None, description="Caption template for image k, e.g. `a photo of <dance1> <robot{k}>`; default: the words joined by spaces.")
    train: TrainSettings = Field(default_factory=TrainSettings)
    preview_prompts: list[str] | None = Field(None, description="Prompts rendered as previews (default: the first captions).")
    resolution: int | None = Field(None, ge=16, le=4096, multiple_of=8, description="Training resolution; default: the model's native size.")

    @model_validator(mode="after")
    def _no_shift_for_place(self) -> "ConceptStep":
        if self.train.shift_px > 0:
            from ..train.config import place_words

            found = place_words([w.init for w in self.words] + [self.caption or ""])
            if found:
                raise ValueError(f"train.shift_px (position augmentation) moves the object, but this asset is about "
                                 f"place (`{'`, `'.join(found)}` in its words or caption): leave shift_px at 0")
        return self

    def caption_for(self, k: int) -> str:
        template = self.caption if self.caption is not None else " ".join(w.token for w in self.words)
        return template.replace("{k}", str(k))


class ComposeStep(Sampling):
    """Generate from prompts that mix pseudo-words of several concept assets (paper, section 3.4):
    the asset whose pseudo-word comes first in a prompt gets its LoRA at `first_scale`, each later one
    at `later_scale`; assets a prompt does not use contribute nothing to it."""

    assets: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="Concept assets: ids of `concepts` steps, or paths (relative to the spec) of asset folders.")
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="Prompts using the assets' pseudo-words; a template over a list var expands into one prompt per value.")
    images: int = Field(1, ge=1, le=1024, description="Images per prompt.")
    first_scale: float = Field(0.8, ge=0, le=4, description="LoRA scale of the asset named first in a prompt (paper: 0.8).")
    later_scale: float = Field(0.5, ge=0, le=4, description="LoRA scale of each later asset in a prompt (paper: 0.5).")
    asset_scales: dict[str, Annotated[float, Field(ge=0, le=4)]] = Field(default_factory=dict, description="Fixed LoRA scale per asset (by the name used in `assets`), overriding the first/later rule.")
    same_seeds: bool = Field(False, description="Derive each image's seed from its prompt with the pseudo-words masked, so that prompts differing only in whose pseudo-words they use (`a red <spot-ti>`, `a red <spot-lora>`) get the same seeds: methods compared on the same noise. Default: from the whole prompt.")
    baseline: bool = Field(True, description="Also draw each prompt that uses an asset as plain words (every pseudo-word replaced by the word it was initialised from, as the asset's card keeps it: `a red <mystar>` -> `a red star`), on the same seeds and with no asset, and show the roots the assets were made from: the contact sheet and `eval` put them beside the concept, so the gain is visible. `false`: only the concept images.")
    lora_windows: dict[str, Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=2, max_length=2)] | Literal["auto"]] = Field(default_factory=dict, description="A time window per asset (by the name used in `assets`): `[start, end]` in t/T (1 = pure noise, 0 = the image), or `auto`: the window kept in the asset's card (its `lora_window`, measured or set when it was trained). The asset's denoiser LoRA acts only while the sampler's t/T is inside it; its embeddings and text-encoder LoRA act throughout. `[0, 0.6]` keeps a LoRA out of the early steps, where the layout is decided.")

    @model_validator(mode="after")
    def _windows(self) -> "ComposeStep":
        for name, window in self.lora_windows.items():
            if name not in self.assets:
                raise ValueError(f"lora_windows names `{name}`, which is not one of `assets`")
            if window != "auto" and window[0] > window[1]:
                raise ValueError(f"lora_windows.{name}: [start, end] with start <= end (got {window})")
        return self

    @field_validator("prompts", "assets", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _as_list(value)


class ExportStep(_Model):
    """Write a concept asset in a format other tools load."""

    asset: str = Field(min_length=1, description="A `concepts` step id, or an asset folder path (contains `/`).")
    format: Literal["diffusers", "a1111", "bundle"] = Field(description="`diffusers` (load_lora_weights + load_textual_inversion), `a1111` (emb_params embeddings + kohya LoRA), `bundle` (one kohya LoRA file with bundle_emb.* embeddings).")


class ClipModel(_Model):
    """The CLIP model used for metrics: an open_clip model name with a pretrained tag (weights in the local
    cache) or a local checkpoint; `pretrained: random` for random weights (tests only)."""

    model: str = Field("ViT-B-32", min_length=1, description=_CLIP_MODEL_HELP)
    pretrained: str | None = Field(None, min_length=1, description=_PRETRAINED_HELP)
    checkpoint: str | None = Field(None, min_length=1, description="Path of a local checkpoint file, relative to the spec (hashed into the key).")


class EvalStep(_Model):
    """The paper's metrics (section 4.1) over compose outputs: prompt consistency (CLIP text-image) and
    identity consistency (CLIP image-image among images of the same concept), a JSON and a plot."""

    from_: list[StepId] = Field(alias="from", min_length=1, description="Compose step(s) whose images are measured.")
    describe: dict[str, str] = Field(default_factory=dict, description="Plain words for each pseudo-word (or `{k}` template), used in prompt consistency: `{\"<robot{k}>\": robot}`.")
    clip: ClipModel = Field(default_factory=ClipModel)
    min_prompt_consistency: float | None = Field(None, ge=-1, le=1, description="Fail the step when a concept's prompt consistency is below this.")
    min_identity_consistency: float | None = Field(None, ge=-1, le=1, description="Fail the step when a concept's identity consistency is below this.")

    @field_validator("from_", mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        return _as_list(value)


SECTIONS: dict[str, str] = {"roots": "root", "edits": "edit", "select": "select", "concepts": "train",
                            "compose": "compose", "export": "export", "eval": "eval"}
"""Spec section name -> step kind."""


def kind_of(section: str, step: Any) -> str:
    """The step kind of a step in a section (`select` splits into `select` (manual) and `select-clip`)."""
    if section == "select" and getattr(step, "by", "manual") == "clip":
        return "select-clip"
    return SECTIONS[section]


class Spec(_Model):
    """A caspec spec, version 1."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="caspec spec", json_schema_extra={"$id": "https://caspec.dev/schema/spec-v1.json"})

    version: Literal[1] = Field(1, description="Spec format version.")
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = Field(None, description="Names the outputs (`out/<name>/`, `reviews/<name>/`); default: the file name without extension.")
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    defaults: Defaults = Field(default_factory=Defaults)
    vars: dict[str, VarValue] = Field(default_factory=dict, description="Values for jinja2 templates in any string; a list value expands a template in a list field into one item per value.")
    roots: dict[StepId, RootStep] = Field(default_factory=dict)
    edits: dict[StepId, EditStep] = Field(default_factory=dict)
    select: dict[StepId, SelectStep] = Field(default_factory=dict)
    concepts: dict[StepId, ConceptStep] = Field(default_factory=dict, description="Concept assets to train (step kind `train`).")
    compose: dict[StepId, ComposeStep] = Field(default_factory=dict, description="Images from prompts mixing concept assets.")
    export: dict[StepId, ExportStep] = Field(default_factory=dict, description="Concept assets in other tools' formats.")
    eval: dict[StepId, EvalStep] = Field(default_factory=dict, description="The paper's CLIP metrics over compose outputs.")

    @model_validator(mode="before")
    @classmethod
    def _embedded_clip_default(cls, data: Any) -> Any:
        """With an embedded model (`toy`, `tiny`), CLIP settings that name no model mean its CLIP (DEFAULT_CLIP)."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        base = model.get("base", "tiny") if isinstance(model, dict) else (model or "tiny")
        if not isinstance(base, str) or base not in DEFAULT_CLIP:  # a bad `model` is reported by validation
            return data
        data = dict(data)
        for section in ("select", "eval"):
            steps = data.get(section)
            if not isinstance(steps, dict):
                continue
            steps = dict(steps)
            for sid, step in steps.items():
                if not isinstance(step, dict) or (section == "select" and step.get("by") != "clip"):
                    continue
                clip = step.get("clip")
                if clip is None:
                    clip = {}
                if isinstance(clip, dict) and "model" not in clip:
                    steps[sid] = {**step, "clip": {**clip, "model": DEFAULT_CLIP[base]}}
            data[section] = steps
        return data

    def roots_of(self, step_id: str) -> list[str]:
        """The `roots` step a step's images descend from, following `from:` through edits, select and concepts
        steps (``[]`` when the chain ends elsewhere, e.g. at an unknown id)."""
        seen: set[str] = set()
        current: str | None = step_id
        while current is not None and current not in seen:
            if current in self.roots:
                return [current]
            seen.add(current)
            step = self.edits.get(current) or self.select.get(current) or self.concepts.get(current)
            current = getattr(step, "from_", None)
        return []

    def steps(self) -> Iterator[tuple[str, str, _Model]]:
        """Yield ``(section, step_id, step)`` for every step, in file order within each section."""
        for section in SECTIONS:
            for step_id, step in getattr(self, section).items():
                yield section, step_id, step


def sampling_for(spec: Spec, step: Sampling, family: Any = None) -> dict[str, Any]:
    """Resolve a step's sampling settings against the spec defaults (step value wins), then the model family's
    (``family``: a :class:`caspec.families.base.Family`; None: SD's, the paper's DDIM, 50 steps, guidance 7.5).
    ``true_cfg_scale`` appears only when set (older keys stay valid)."""
    d = spec.defaults
    fam = family.sampling_defaults if family is not None else SD_SAMPLING
    out = {}
    for name in ("seed", "steps", "guidance_scale", "resolution", "negative_prompt"):
        value = getattr(step, name)
        out[name] = getattr(d, name) if value is None else value
        if out[name] is None and name in fam:
            out[name] = fam[name]
    out["scheduler"] = d.scheduler or fam["scheduler"]
    cfg = step.true_cfg_scale if step.true_cfg_scale is not None else d.true_cfg_scale
    if cfg is not None:
        out["true_cfg_scale"] = float(cfg)
    return out


SD_SAMPLING: dict[str, Any] = {"steps": 50, "guidance_scale": 7.5, "scheduler": "ddim"}
"""The sampling defaults of SD 1.x, SD 2.x and SDXL (the paper's)."""
