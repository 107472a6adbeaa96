"""The embedded random-weight FLUX.1-shaped models ``tiny-flux`` (FLUX.1-dev's layout) and
``tiny-flux-schnell`` (FLUX.1-schnell's): diffusers ``FluxPipeline`` folders built locally for offline tests.

Like :mod:`caspec.models.tiny`, their weights come from fixed seeds (CPU, fp32) so every machine with the
same pinned ML stack builds the same bytes; nothing is downloaded. The layout is FLUX.1's in miniature:

* ``transformer``: ``FluxTransformer2DModel`` (1 double-stream + 1 single-stream block, 2 heads of 16,
  RoPE axes 4+4+8), ``in_channels`` 64 = 16 latent channels x 2x2 packing; ``guidance_embeds`` on for
  ``tiny-flux`` (dev's distilled guidance), off for ``tiny-flux-schnell``;
* ``vae``: a 16-channel ``AutoencoderKL`` without quant convs, FLUX.1's scaling (0.3611) and shift
  (0.1159) factors, two blocks (``vae_scale_factor`` 2, so 64 px is a 32x32 latent, 16x16 = 256 tokens);
* ``text_encoder``/``tokenizer``: CLIP-L's role (only its pooled output is used), width 32, with CLIP's
  real BPE vocabulary (open_clip's copy, see :func:`caspec.models.tiny.clip_vocab`), 77 positions;
* ``text_encoder_2``/``tokenizer_2``: T5's role (the whole token sequence), a 2-layer ``T5EncoderModel``
  of width 32 (``joint_attention_dim``) and a small sentencepiece-style Unigram tokenizer built in
  memory (every printable ASCII character, with and without the word-start mark, plus common words),
  ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 and T5's 100 sentinel tokens;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with dev's dynamic shifting (mu from the image's
  token count) or schnell's fixed shift 1.

A Kontext model has FLUX.1-dev's components, so ``tiny-flux`` also serves ``FluxKontextPipeline`` tests.

``tiny_flux_identity(name)`` is pure (it builds and imports nothing heavy) and is what enters cache keys;
``ensure_tiny_flux(name)`` builds the folder once (atomically, under a file lock) and returns its path.
"""
from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tiny import (IDENTITY_FILE, TEXT_CONFIG, TINY_SEED, build_atomically, cache_root, make_clip_tokenizer,
                   package_version, seeded_fp32, write_clip_vocab)

TINY_FLUX_VERSION = 1
"""Bump whenever anything below changes the built weights, configs or tokenizers."""

TINY_FLUX_RESOLUTION = 64
FAMILY = "flux"

# Each component is built under its own seed (TINY_SEED + offset): changing one never changes another.
SEED_OFFSETS = {"transformer": 10, "vae": 11, "text_encoder": 12, "text_encoder_2": 13}

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x (2 x 2) packing
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # = T5 d_model
    "pooled_projection_dim": 32,  # = CLIP hidden size
    "guidance_embeds": True,
    "axes_dims_rope": [4, 4, 8],  # sums to attention_head_dim
}
VAE_CONFIG: dict[str, Any] = {
    "sample_size": TINY_FLUX_RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
CLIP_CONFIG: dict[str, Any] = dict(TEXT_CONFIG)  # width 32, CLIP's 49408-token vocabulary, 77 positions
CLIP_MAX_LENGTH = 77
T5_CONFIG: dict[str, Any] = {  # hf-internal-testing/tiny-random-t5's shape, 2 layers
    "vocab_size": 1000,
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "relu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
T5_MAX_LENGTH = 512
T5_EXTRA_IDS = 100
SCHEDULER_DEV: dict[str, Any] = {  # FLUX.1-dev's scheduler_config.json
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHEDULER_SCHNELL: dict[str, Any] = {**SCHEDULER_DEV, "shift": 1.0, "use_dynamic_shifting": False}

# The T5 tokenizer's pieces: specials, the word-start mark, every printable ASCII character (alone and
# after the mark), then whole words. Unigram picks the segmentation with the best total score, so a
# known word is one token and anything else splits into characters.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_WORDS = tuple("""
a an the of in on at with and or to for from by as is are it this that his her its their
photo photograph picture image painting drawing render illustration sketch portrait close up view
red orange yellow green blue purple pink brown black white gray grey silver gold golden colorful dark
light bright small big large tiny huge tall short old new young beautiful cute happy sad style
robot cat dog bird fish horse cow man woman person child boy girl face hand head eye eyes hair
house car tree flower flowers sky sun moon star city street forest mountain river sea ocean beach
table chair cup bottle book hat shirt dress shoe shoes ball box toy teddy bear dragon castle
dancing running sitting standing walking flying jumping playing holding wearing looking made
shape shapes circle square triangle cube sphere background foreground center left right top bottom
high quality detailed realistic cartoon anime digital art oil watercolor studio lighting sharp focus
""".split())
T5_SCORES = {"word": -4.0, "mark": -6.0, "marked_char": -7.5, "char": -8.0}


@dataclass(frozen=True)
class TinyFluxModel:
    """One embedded FLUX.1-shaped random model: its name, variant and the configs that differ."""

    name: str
    variant: str  # dev | schnell
    version: int
    transformer: dict[str, Any]
    scheduler: dict[str, Any]


TINY_FLUX_MODELS: dict[str, TinyFluxModel] = {
    "tiny-flux": TinyFluxModel("tiny-flux", "dev", TINY_FLUX_VERSION, TRANSFORMER_CONFIG, SCHEDULER_DEV),
    "tiny-flux-schnell": TinyFluxModel("tiny-flux-schnell", "schnell", TINY_FLUX_VERSION,
                                       {**TRANSFORMER_CONFIG, "guidance_embeds": False}, SCHEDULER_SCHNELL),
}
"""The embedded FLUX.1-shaped random models by name (``version`` bumps when their weights change)."""

_REQUIRED = (
    "model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/tokenizer.json",
    "scheduler/scheduler_config.json",
    IDENTITY_FILE,
)


def t5_vocab() -> list[tuple[str, float]]:
    """The tiny T5 tokenizer's Unigram pieces and scores (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in T5_SPECIALS]
    pieces.append(("\u2581", T5_SCORES["mark"]))
    chars = string.ascii_letters + string.digits + string.punctuation
    for c in chars:
        pieces.append(("\u2581" + c, T5_SCORES["marked_char"]))
        pieces.append((c, T5_SCORES["char"]))
    seen = {p for p, _ in pieces}
    for w in T5_WORDS:
        piece = "\u2581" + w
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, T5_SCORES["word"]))
    assert len(pieces) + T5_EXTRA_IDS <= T5_CONFIG["vocab_size"], len(pieces)
    return pieces


def _t5_vocab_digest() -> str:
    return hashlib.sha256(json.dumps(t5_vocab(), ensure_ascii=False).encode("utf-8")).hexdigest()


def tiny_flux_identity(name: str = "tiny-flux") -> dict[str, Any]:
    """Everything that decides an embedded FLUX.1-shaped model's files (pure: builds and imports nothing heavy)."""
    m = TINY_FLUX_MODELS[name]
    return {
        "family": FAMILY,
        "name": name,
        "variant": m.variant,
        "tiny_flux_version": m.version,
        "seed": TINY_SEED,
        "seed_offsets": dict(SEED_OFFSETS),
        "resolution": TINY_FLUX_RESOLUTION,
        "transformer": m.transformer,
        "vae": VAE_CONFIG,
        "text_encoder": CLIP_CONFIG,
        "text_encoder_2": T5_CONFIG,
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", **m.scheduler},
        "tokenizer": {"bpe": "open_clip default_bpe", "model_max_length": CLIP_MAX_LENGTH},
        "tokenizer_2": {"unigram_sha256": _t5_vocab_digest(), "extra_ids": T5_EXTRA_IDS,
                        "model_max_length": T5_MAX_LENGTH},
        "torch": package_version("torch"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "open_clip_torch": package_version("open_clip_torch"),
    }


def tiny_flux_dir(name: str = "tiny-flux") -> Path:
    """Where an embedded FLUX.1-shaped model's folder lives (it may not be built yet)."""
    return cache_root() / "models" / f"{name}-v{TINY_FLUX_MODELS[name].version}"


def _is_complete(folder: Path, name: str = "tiny-flux") -> bool:
    if not all((folder / rel).is_file() for rel in _REQUIRED):
        return False
    try:
        stored = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(tiny_flux_identity(name)))


def ensure_tiny_flux(name: str = "tiny-flux") -> Path:
    """Build an embedded FLUX.1-shaped model once into the user cache (see
    :func:`caspec.models.tiny.build_atomically`); its folder."""
    if name not in TINY_FLUX_MODELS:
        raise KeyError(f"unknown embedded FLUX model {name!r} (known: {', '.join(TINY_FLUX_MODELS)})")
    return build_atomically(tiny_flux_dir(name), lambda folder: _is_complete(folder, name),
                            lambda out: build_tiny_flux(out, name))


# ---------------------------------------------------------------------------------------------
# building


def t5_tokenizer() -> Any:
    """The tiny T5 tokenizer, built in memory: a Unigram model with T5's Metaspace pre-tokenizer and decoder
    (``T5TokenizerFast``'s own construction from a piece list, which is also how ``from_pretrained`` rebuilds
    it from ``tokenizer.json``, so a saved copy tokenizes the same)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)


def clip_tokenizer() -> Any:
    """CLIP's real BPE tokenizer (open_clip's merges), 77 positions, padding with ``<|endoftext|>``."""
    return make_clip_tokenizer(None)


def build_components(name: str = "tiny-flux") -> dict[str, Any]:
    """The model's components, built from their seeds (fp32, CPU), as ``FluxPipeline(**components)`` takes them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    m = TINY_FLUX_MODELS[name]
    with seeded_fp32() as seed:
        seed(SEED_OFFSETS["transformer"])
        transformer = FluxTransformer2DModel(**m.transformer)
        seed(SEED_OFFSETS["vae"])
        vae = AutoencoderKL(**VAE_CONFIG)
        seed(SEED_OFFSETS["text_encoder"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
        seed(SEED_OFFSETS["text_encoder_2"])
        text_encoder_2 = T5EncoderModel(T5Config(**T5_CONFIG))
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**m.scheduler), vae=vae, text_encoder=text_encoder,
                tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer(),
                transformer=transformer)


def build_tiny_flux(out: Path, name: str = "tiny-flux") -> None:
    """Build an embedded FLUX.1-shaped model into ``out``: a ``FluxPipeline.save_pretrained`` folder
    (``transformer/ vae/ text_encoder/ tokenizer/ text_encoder_2/ tokenizer_2/ scheduler/``) and the
    identity file ``caspec-tiny.json``."""
    from diffusers import FluxPipeline

    out = Path(out)
    pipe = FluxPipeline(**build_components(name))
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_vocab(out / "tokenizer")  # the classic vocab.json/merges.txt too, as FLUX.1 folders ship them
    (out / IDENTITY_FILE).write_text(json.dumps(tiny_flux_identity(name), indent=1, sort_keys=True),
                                     encoding="utf-8")


__all__ = ["TINY_FLUX_VERSION", "TINY_FLUX_RESOLUTION", "TINY_FLUX_MODELS", "TinyFluxModel", "tiny_flux_identity",
           "tiny_flux_dir", "ensure_tiny_flux", "build_tiny_flux", "build_components", "t5_tokenizer",
           "clip_tokenizer", "t5_vocab"]
