"""The embedded random-weight models ``tiny`` (SD 1.x-shaped), ``tiny-xl`` (SDXL-shaped) and ``tiny-v``
(SD 2.x-shaped, v-prediction): pipelines built locally for offline tests.

Their weights come from fixed seeds (CPU, fp32), so every machine with the same pinned ML stack
builds the same bytes; nothing is downloaded. The tokenizer is CLIP's real BPE vocabulary, taken
from the copy open_clip ships. The result is an ordinary diffusers ``save_pretrained`` folder in
the user cache, so it loads through the same code path as any local model folder.

* ``tiny``: one CLIP text encoder (width 32), epsilon prediction, 64 px;
* ``tiny-xl``: SDXL's layout: two text encoders of different widths (32, like CLIP ViT-L's role, and
  48 with a text projection, OpenCLIP ViT-bigG's role), the UNet's added ``text_time`` embedding
  (pooled text + 6 time ids), cross-attention over both encoders' hidden states (32 + 48), linear
  projections, ``force_zeros_for_empty_prompt``;
* ``tiny-v``: SD 2.x's layout: one OpenCLIP-H-shaped text encoder (GELU, ``!`` as the pad token, width
  48), linear projections, v-prediction.

``tiny_identity(name)`` is pure (it builds nothing) and is what enters cache keys; ``ensure_tiny(name)``
builds the folder once (atomically, under a file lock) and returns its path.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

TINY_VERSION = 1
"""Bump whenever anything below changes the built weights, configs or tokenizer."""

TINY_SEED = 20240229
TINY_RESOLUTION = 64
IDENTITY_FILE = "caspec-tiny.json"

# Component configs. Each is built under its own seed (TINY_SEED + offset) so that changing one
# component never changes another's weights.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
}
VAE_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "hidden_act": "quick_gelu",
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
TOKENIZER_MAX_LENGTH = 77
SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2}

# tiny-xl: SDXL's layout in miniature (diffusers' own SDXL pipeline tests use the same shapes).
XL_TEXT_CONFIG: dict[str, Any] = {**TEXT_CONFIG, "hidden_act": "gelu"}
XL_TEXT_2_CONFIG: dict[str, Any] = {**TEXT_CONFIG, "hidden_size": 48, "intermediate_size": 64, "hidden_act": "gelu",
                                    "projection_dim": 48, "pad_token_id": 0}
XL_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 6 * 8 + 48,  # 6 time ids x 8 + the pooled text (projection_dim)
    "cross_attention_dim": 32 + 48,  # both encoders' hidden states, concatenated
    "norm_num_groups": 32,
}
# tiny-v: SD 2.x's layout (OpenCLIP-H-shaped text encoder, linear projections, v-prediction).
V_TEXT_CONFIG: dict[str, Any] = {**TEXT_CONFIG, "hidden_size": 48, "intermediate_size": 64, "hidden_act": "gelu",
                                 "pad_token_id": 0}
V_UNET_CONFIG: dict[str, Any] = {**UNET_CONFIG, "attention_head_dim": [2, 4], "use_linear_projection": True,
                                 "cross_attention_dim": 48}
V_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
PAD_TOKEN_2 = "!"  # SD 2.x's tokenizer and SDXL's second tokenizer pad with "!" (id 0)


@dataclass(frozen=True)
class TinyModel:
    """One embedded random-weight model: its name, family and component configs."""

    name: str
    family: str  # sd1 | sd2 | sdxl (see caspec.families)
    version: int
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    pad_token: str | None = None  # the (first) tokenizer's pad token; None: CLIP's <|endoftext|>


TINY_MODELS: dict[str, TinyModel] = {
    "tiny": TinyModel("tiny", "sd1", TINY_VERSION, UNET_CONFIG, TEXT_CONFIG),
    "tiny-xl": TinyModel("tiny-xl", "sdxl", 1, XL_UNET_CONFIG, XL_TEXT_CONFIG, XL_TEXT_2_CONFIG),
    "tiny-v": TinyModel("tiny-v", "sd2", 1, V_UNET_CONFIG, V_TEXT_CONFIG, scheduler=V_SCHEDULER_CONFIG,
                        pad_token=PAD_TOKEN_2),
}
"""The embedded random-weight models by name (their ``version`` bumps when their weights change)."""

# What a finished build folder must contain (checked before it is trusted).
_REQUIRED = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    IDENTITY_FILE,
)


def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - broken install
        return "unknown"


def cache_root() -> Path:
    """caspec's user cache: ``$CASPEC_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/caspec``."""
    env = os.environ.get("CASPEC_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "caspec"


def tiny_identity(name: str = "tiny") -> dict[str, Any]:
    """Everything that decides an embedded random model's weights (pure: builds and imports nothing heavy)."""
    m = TINY_MODELS[name]
    ident: dict[str, Any] = {
        "tiny_version": m.version,
        "seed": TINY_SEED,
        "seed_offsets": dict(SEED_OFFSETS),
        "resolution": TINY_RESOLUTION,
        "unet": m.unet,
        "vae": VAE_CONFIG,
        "text_encoder": m.text_encoder,
        "scheduler": {"class": "DDIMScheduler", **m.scheduler},
        "tokenizer": {"bpe": "open_clip default_bpe", "model_max_length": TOKENIZER_MAX_LENGTH},
        "torch": package_version("torch"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "open_clip_torch": package_version("open_clip_torch"),
    }
    if name != "tiny":  # tiny's identity predates the others: kept as it was, so its keys stay
        ident.update(name=name, family=m.family, text_encoder_2=m.text_encoder_2, pad_token=m.pad_token)
    return ident


def tiny_dir(name: str = "tiny") -> Path:
    """Where an embedded random model's folder lives (it may not be built yet)."""
    return cache_root() / "models" / f"{name}-v{TINY_MODELS[name].version}"


def _required(name: str) -> tuple[str, ...]:
    if TINY_MODELS[name].text_encoder_2 is None:
        return _REQUIRED
    return _REQUIRED + ("text_encoder_2/config.json", "text_encoder_2/model.safetensors",
                        "tokenizer_2/tokenizer_config.json")


def _is_complete(folder: Path, name: str = "tiny") -> bool:
    if not all((folder / rel).is_file() for rel in _required(name)):
        return False
    try:
        stored = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(tiny_identity(name)))


def build_atomically(target: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """Build a model folder once: ``build(tmp)`` in a temporary folder beside ``target``, then moved into
    place with ``os.replace``; a file lock keeps two processes from building at once. A ``target`` that
    is not ``is_complete`` (half-written, or built by another stack) is rebuilt."""
    from filelock import FileLock

    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_complete(target):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        try:
            build(tmp)
            if target.exists():  # stale or half-written: move aside, then drop
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny(name: str = "tiny") -> Path:
    """Build an embedded random model once into the user cache (see :func:`build_atomically`); its folder."""
    return build_atomically(tiny_dir(name), lambda folder: _is_complete(folder, name),
                            lambda out: build_tiny(out, name))


# ---------------------------------------------------------------------------------------------
# building


def _bpe_path() -> Path:
    """open_clip's shipped BPE merges (``open_clip.tokenizer.default_bpe()``), found without
    importing open_clip (whose import pulls in much more than the file name)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                return candidate
    from open_clip.tokenizer import default_bpe  # pragma: no cover - unusual layout

    return Path(default_bpe())  # pragma: no cover


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (49408 tokens) and merge list, from open_clip's shipped merges file."""
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == TEXT_CONFIG["vocab_size"], len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_clip_vocab(folder: Path) -> None:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (header ``#version: 0.2``) into ``folder``."""
    vocab, merges = clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")


def make_clip_tokenizer(pad_token: str | None) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH, **kwargs)


@contextmanager
def seeded_fp32() -> Iterator[Callable[[int], None]]:
    """Build modules in fp32, each under a seed of its own: yields ``seed(offset)``, which seeds torch with
    ``TINY_SEED + offset`` before the next module is made. The caller's global RNG state and default dtype
    are restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        prev_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            yield lambda offset: torch.manual_seed(TINY_SEED + offset)
        finally:
            torch.set_default_dtype(prev_dtype)


def build_tiny(out: Path, name: str = "tiny") -> None:
    """Build an embedded random model's components into ``out`` (a diffusers ``save_pretrained`` layout)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    m = TINY_MODELS[name]
    with seeded_fp32() as seed:
        seed(SEED_OFFSETS["unet"])
        unet = UNet2DConditionModel(**m.unet)
        seed(SEED_OFFSETS["vae"])
        vae = AutoencoderKL(**VAE_CONFIG)
        seed(SEED_OFFSETS["text_encoder"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**m.text_encoder))
        text_encoder_2 = None
        if m.text_encoder_2 is not None:
            seed(SEED_OFFSETS["text_encoder"] + 1)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**m.text_encoder_2))

    scheduler = DDIMScheduler(**m.scheduler)
    tokenizer = make_clip_tokenizer(m.pad_token)
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=make_clip_tokenizer(PAD_TOKEN_2), unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (out / sub).is_dir():
            write_clip_vocab(out / sub)  # the classic files too, as SD folders ship them
    (out / IDENTITY_FILE).write_text(json.dumps(tiny_identity(name), indent=1, sort_keys=True), encoding="utf-8")


__all__ = ["TINY_VERSION", "TINY_RESOLUTION", "TINY_MODELS", "TinyModel", "cache_root", "tiny_identity", "tiny_dir",
           "ensure_tiny", "build_tiny"]
