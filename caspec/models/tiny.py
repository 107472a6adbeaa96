"""The embedded default model ``tiny``: a Stable-Diffusion-shaped pipeline built locally.

Its weights come from fixed seeds (CPU, fp32), so every machine with the same pinned ML stack
builds the same bytes; nothing is downloaded. The tokenizer is CLIP's real BPE vocabulary, taken
from the copy open_clip ships. The result is an ordinary diffusers ``save_pretrained`` folder in
the user cache, so it loads through the same code path as any local model folder.

``tiny_identity()`` is pure (it builds nothing) and is what enters cache keys; ``ensure_tiny()``
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
from pathlib import Path
from typing import Any, Callable

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


def _version(dist: str) -> str:
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


def tiny_identity() -> dict[str, Any]:
    """Everything that decides tiny's weights (pure: builds and imports nothing heavy)."""
    return {
        "tiny_version": TINY_VERSION,
        "seed": TINY_SEED,
        "seed_offsets": dict(SEED_OFFSETS),
        "resolution": TINY_RESOLUTION,
        "unet": UNET_CONFIG,
        "vae": VAE_CONFIG,
        "text_encoder": TEXT_CONFIG,
        "scheduler": {"class": "DDIMScheduler", **SCHEDULER_CONFIG},
        "tokenizer": {"bpe": "open_clip default_bpe", "model_max_length": TOKENIZER_MAX_LENGTH},
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "open_clip_torch": _version("open_clip_torch"),
    }


def tiny_dir() -> Path:
    """Where the tiny model folder lives (it may not be built yet)."""
    return cache_root() / "models" / f"tiny-v{TINY_VERSION}"


def _is_complete(folder: Path) -> bool:
    if not all((folder / rel).is_file() for rel in _REQUIRED):
        return False
    try:
        stored = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == json.loads(json.dumps(tiny_identity()))


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


def ensure_tiny() -> Path:
    """Build the tiny model once into the user cache (see :func:`build_atomically`) and return its folder."""
    return build_atomically(tiny_dir(), _is_complete, build_tiny)


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


def build_tiny(out: Path) -> None:
    """Build the tiny pipeline's components into ``out`` (a diffusers ``save_pretrained`` layout)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def seeded(name: str):
        torch.manual_seed(TINY_SEED + SEED_OFFSETS[name])

    # never disturb the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        prev_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            seeded("unet")
            unet = UNet2DConditionModel(**UNET_CONFIG)
            seeded("vae")
            vae = AutoencoderKL(**VAE_CONFIG)
            seeded("text_encoder")
            text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        finally:
            torch.set_default_dtype(prev_dtype)

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_vocab(out / "tokenizer")  # the classic files too, as SD folders ship them
    (out / IDENTITY_FILE).write_text(json.dumps(tiny_identity(), indent=1, sort_keys=True), encoding="utf-8")


__all__ = ["TINY_VERSION", "TINY_RESOLUTION", "cache_root", "tiny_identity", "tiny_dir", "ensure_tiny", "build_tiny"]
