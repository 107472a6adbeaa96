"""Which weights a spec means (``model_identity``) and loading them (``load_pipeline``).

A model is one of:

* ``tiny``: the embedded model built from fixed seeds (:mod:`caspec.models.tiny`), random weights;
* ``toy``: the embedded model trained on the shapes world, shipped in the package (:mod:`caspec.models.toy`);
* a local diffusers folder (absolute, or relative to the spec file), recognised by ``model_index.json``;
* a Hugging Face hub id, resolved offline from the local hub cache to a pinned commit.

``model_identity`` is what enters cache keys. It never loads a model: for a folder (or a hub
snapshot) it hashes exactly the files :func:`load_pipeline` reads (:func:`loaded_files`: the
configs, tokenizer and the weight files diffusers/transformers pick, never ``safety_checker/``,
``feature_extractor/``, single-file checkpoints or weight variants that are not loaded; digests
cached by path, size and mtime so re-planning is instant, see
:func:`caspec.store.hashing.cached_sha256_files`); for a hub id it pins the revision to the commit
hash the local cache holds. The identity has two parts: the *weights* (everything but
:data:`RUN_FIELDS`) and how they run (the dtype). The whole identity enters the keys of steps that
run the model (the dtype changes their outputs; the device is not part of it), while an asset's
compatibility with a model is decided by the weights part alone (:func:`weights_identity`,
:func:`identity_differences`): an asset trained in fp32 composes in fp16 or bf16.

``load_pipeline`` returns a :class:`Pipe` (cached per process) loaded with ``from_pretrained(...,
local_files_only=True)``, the same path for ``tiny`` (its cache folder) and for real models.
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..spec.models import ModelSpec
from .. import families
from ..families import embedded_family, folder_family
from .tiny import TINY_MODELS, TINY_RESOLUTION, VAE_CONFIG, cache_root, ensure_tiny, tiny_identity
from .tiny_flux import TINY_FLUX_MODELS, TINY_FLUX_RESOLUTION, ensure_tiny_flux, tiny_flux_identity
from .tiny_flux import VAE_CONFIG as FLUX_VAE_CONFIG
from .toy import TOY_RESOLUTION, ensure_toy, toy_identity

EMBEDDED = ("tiny", "toy", "tiny-xl", "tiny-v", "tiny-flux", "tiny-flux-schnell")

DIGESTS_FILE = "digests.json"
RUN_FIELDS = ("dtype",)
"""Identity fields that say how the weights run, not which weights they are."""
WEIGHT_STEMS = {"transformers": ("model", "pytorch_model"),
                "diffusers": ("diffusion_pytorch_model", "diffusion_pytorch_model")}
SCHEDULER_CONFIG_FILE = "scheduler/scheduler_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# device and dtype


def resolve_device(model: ModelSpec) -> str:
    """``cuda`` or ``cpu`` (``auto`` picks CUDA when available)."""
    if model.device != "auto":
        return model.device
    if not _may_have_cuda():  # spare planning a torch import on machines without a GPU
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _may_have_cuda() -> bool:
    """False only when CUDA is surely absent (no NVIDIA driver, or no visible devices)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if os.name != "posix":
        return True
    markers = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")  # /dev/dxg: WSL2
    return any(Path(m).exists() for m in markers)


def resolve_dtype(model: ModelSpec, device: str | None = None) -> str:
    """``fp32``/``fp16``/``bf16``; ``auto`` is fp16 on CUDA and fp32 on CPU."""
    if model.dtype != "auto":
        return model.dtype
    if device is None:
        device = resolve_device(model)
    return "fp16" if device == "cuda" else "fp32"


# ---------------------------------------------------------------------------------------------
# where the weights are


@dataclass(frozen=True)
class ModelLocation:
    kind: str  # an embedded name ("tiny", "toy", "tiny-xl", "tiny-v") | "local" | "hub"
    folder: Path | None  # None for tiny until built
    repo: str | None = None
    commit: str | None = None


def _hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _offline_hint(repo: str) -> str:
    return (
        f"download it once on a machine with network (`huggingface-cli download {repo}`) and copy the "
        "Hugging Face cache here (or set HF_HUB_CACHE to it), or point `model.base` at a local diffusers "
        "folder (one with model_index.json); `model: tiny` needs no download"
    )


def embedded_folder(name: str) -> Path:
    """The folder caspec builds an embedded model into (whether built yet or not; reads, writes nothing)."""
    if name in TINY_MODELS:
        from .tiny import tiny_dir

        return tiny_dir(name)
    if name in TINY_FLUX_MODELS:
        from .tiny_flux import tiny_flux_dir

        return tiny_flux_dir(name)
    from .toy import toy_dir

    return toy_dir(toy_identity())


def embedded_vocabulary(base: str) -> frozenset[str] | None:
    """The words an embedded model was trained on, where it knows only some (``toy``: the shapes world's
    caption words); None where any word means something (real models; the random-weight tiny ones)."""
    if base != "toy":
        return None
    from ..toyworld.data import vocabulary

    return vocabulary()


def is_hub_id(base: str) -> bool:
    """Whether ``base`` has the shape of a hub id (``org/name``)."""
    return bool(_HUB_ID.match(base))


def _resolve_hub(repo: str, revision: str | None) -> ModelLocation:
    rev = revision or "main"
    hub = _hf_hub_cache()
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    commit: str | None = None
    if _COMMIT.match(rev) and (repo_dir / "snapshots" / rev).is_dir():
        commit = rev
    else:
        ref = repo_dir / "refs" / rev
        if ref.is_file():
            commit = ref.read_text(encoding="utf-8").strip()
    if commit is None or not _COMMIT.match(commit):
        raise ModelError(
            f"model `{repo}` (revision `{rev}`) is not available offline: not found in the local Hugging Face cache {hub}",
            hint=_offline_hint(repo),
        )
    snapshot = repo_dir / "snapshots" / commit
    if not (snapshot / "model_index.json").is_file():
        raise ModelError(
            f"model `{repo}` at commit {commit[:12]} is only partly in the local Hugging Face cache "
            f"({snapshot} has no model_index.json)",
            hint=_offline_hint(repo),
        )
    folder_family(snapshot)
    return ModelLocation("hub", snapshot, repo=repo, commit=commit)


def locate_model(model: ModelSpec, spec_dir: Path) -> ModelLocation:
    """Where ``model``'s weights are, without loading or building anything."""
    base = model.base
    if base in EMBEDDED:
        return ModelLocation(base, None)
    path = Path(base).expanduser()
    if not path.is_absolute():
        path = Path(spec_dir) / path
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ModelError(
                f"`{base}` ({path}) is not a diffusers model folder: it has no model_index.json",
                hint="point `model.base` at a folder written by diffusers' save_pretrained (or a hub snapshot), "
                "or use `tiny`",
            )
        folder_family(path)  # refuses layouts caspec cannot run (SD 3, Flux, the SDXL refiner), naming them
        return ModelLocation("local", path.resolve())
    if _HUB_ID.match(base):
        return _resolve_hub(base, model.revision)
    raise ModelError(
        f"model `{base}` is neither an embedded model, an existing folder (looked for {path}), nor a hub id "
        "(`org/name`)",
        hint=f"use an embedded model ({', '.join(f'`{m}`' for m in EMBEDDED)}; `toy` is trained on the shapes world, "
        "the others have random weights), a diffusers folder relative to the spec file, or a hub id already in the "
        "local cache",
    )


# ---------------------------------------------------------------------------------------------
# identity


def _add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (the rule diffusers and transformers share)."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _index_shards(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names (relative to its folder); none if it is unreadable."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return []


def component_weight_files(sub: Path, library: str, variant: str | None) -> list[str]:
    """The weight files of one component folder that ``from_pretrained`` loads (names relative to ``sub``).

    diffusers (0.42): ``diffusion_pytorch_model[.variant].safetensors.index.json`` (+ shards), else the
    single ``.safetensors``, else the ``.bin``; transformers (5.x): ``model[.variant].safetensors``,
    else its index (+ shards), else ``pytorch_model[.variant].bin``, else its index. A ``.bin`` beside a
    ``.safetensors`` is therefore never loaded, nor a variant other than ``variant``."""
    st_stem, bin_stem = WEIGHT_STEMS[library]
    single_st = _add_variant(f"{st_stem}.safetensors", variant)
    index_st = _add_variant(f"{st_stem}.safetensors.index.json", variant)
    single_bin = _add_variant(f"{bin_stem}.bin", variant)
    index_bin = _add_variant(f"{bin_stem}.bin.index.json", variant)
    order = ([index_st, single_st, single_bin] if library == "diffusers"
             else [single_st, index_st, single_bin, index_bin])
    for name in order:
        if (sub / name).is_file():
            return [name, *_index_shards(sub / name)] if name.endswith(".index.json") else [name]
    return []


def _tokenizer_files(folder: Path) -> list[str]:
    """Every file of ``tokenizer/`` (and ``tokenizer_2/``, where a family has a second one): all small; which of
    them the backend reads varies with its version."""
    out: list[str] = []
    for name in ("tokenizer", "tokenizer_2"):
        sub = folder / name
        if sub.is_dir():
            out += sorted(f"{name}/{p.name}" for p in sub.iterdir() if p.is_file() and not p.name.startswith("."))
    return out


def loaded_files(folder: Path) -> list[str]:
    """The files of a diffusers folder that :func:`load_pipeline` reads, relative to it (sorted).

    Tokenizer, text encoder, UNet, VAE (config + the weights ``from_pretrained`` picks, see
    :func:`component_weight_files`) and the scheduler config. Not ``model_index.json`` (caspec builds
    each component itself), ``safety_checker/``, ``feature_extractor/``, top-level single-file
    checkpoints (``*.ckpt``, ``v1-5-pruned.safetensors``) or variants that are not loaded."""
    files = _tokenizer_files(folder)
    for comp, library in families.get(folder_family(folder)).weights:
        sub = folder / comp
        files.append(f"{comp}/config.json")
        files += [f"{comp}/{name}" for name in component_weight_files(sub, library, weight_variant(sub))]
    files.append(SCHEDULER_CONFIG_FILE)
    return sorted(f for f in set(files) if (folder / f).is_file())


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file :func:`loaded_files` names, through caspec's digest cache."""
    from ..store.hashing import cached_sha256_files

    rel = loaded_files(folder)
    digests = cached_sha256_files([folder / r for r in rel], cache_root() / DIGESTS_FILE)
    return {r: digests[folder / r] for r in rel}


def weights_identity(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a model identity that names the weights (without :data:`RUN_FIELDS` such as the dtype):
    what decides whether an asset trained on one model fits another."""
    if not isinstance(identity, dict):
        return None
    return {k: v for k, v in identity.items() if k not in RUN_FIELDS}


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:12] if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40,64}", value) else text[:60]


def identity_differences(a: dict[str, Any] | None, b: dict[str, Any] | None, *, limit: int = 4) -> list[str]:
    """How the weights parts of two identities differ, in words (empty: the same weights).

    ``a`` is "theirs" (e.g. the asset's base model), ``b`` "ours"; e.g. ``["kind: hub vs tiny"]`` or
    ``["unet/diffusion_pytorch_model.safetensors: 3f2a... vs 91c0..."]``."""
    wa, wb = weights_identity(a) or {}, weights_identity(b) or {}
    if wa == wb:
        return []
    if wa.get("kind") != wb.get("kind"):
        return [f"kind: {wa.get('kind', '?')} vs {wb.get('kind', '?')}"]
    out: list[str] = []
    if wa.get("kind") == "local":
        fa, fb = wa.get("files") or {}, wb.get("files") or {}
        for name in sorted(set(fa) | set(fb)):
            if fa.get(name) != fb.get(name):
                out.append(f"{name}: {_short(fa[name]) if name in fa else 'absent'} vs "
                           f"{_short(fb[name]) if name in fb else 'absent'}")
    for name in sorted(set(wa) | set(wb)):
        if name != "files" and wa.get(name) != wb.get(name):
            out.append(f"{name}: {_short(wa.get(name))} vs {_short(wb.get(name))}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def model_identity(model: ModelSpec, spec_dir: Path) -> dict[str, Any]:
    """What enters cache keys for ``model`` (never loads weights): the weights part plus the dtype
    (:data:`RUN_FIELDS`), not the device."""
    loc = locate_model(model, spec_dir)
    dtype = resolve_dtype(model)
    if loc.kind in TINY_MODELS:
        return {"kind": loc.kind, **tiny_identity(loc.kind), "dtype": dtype}
    if loc.kind in TINY_FLUX_MODELS:
        return {"kind": loc.kind, **tiny_flux_identity(loc.kind), "dtype": dtype}
    if loc.kind == "toy":
        return {"kind": "toy", **toy_identity(), "dtype": dtype}
    if loc.kind == "hub":
        return {"kind": "hub", "repo": loc.repo, "commit": loc.commit, "dtype": dtype}
    assert loc.folder is not None
    return {"kind": "local", "files": _file_digests(loc.folder), "dtype": dtype}


def native_resolution(model: ModelSpec, spec_dir: Path) -> int:
    """The model's native square image size, read from its configs (no weights loaded)."""
    loc = locate_model(model, spec_dir)
    if loc.kind in TINY_MODELS:
        return TINY_RESOLUTION
    if loc.kind in TINY_FLUX_MODELS:
        return TINY_FLUX_RESOLUTION
    if loc.kind == "toy":
        return TOY_RESOLUTION
    assert loc.folder is not None
    family = families.get(folder_family(loc.folder))
    try:
        return family.native_resolution(loc.folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot read the {family.denoiser}/vae configs of {loc.folder}: {exc}",
                         hint=f"is this a complete {family.title} diffusers folder?") from None


def model_configs(model: ModelSpec, spec_dir: Path) -> dict[str, Any]:
    """The model's ``scheduler`` and ``vae`` configs (what decides where an edit starts), without loading or
    building anything."""
    loc = locate_model(model, spec_dir)
    if loc.kind in TINY_MODELS:
        return {"scheduler": dict(TINY_MODELS[loc.kind].scheduler), "vae": dict(VAE_CONFIG)}
    if loc.kind in TINY_FLUX_MODELS:
        return {"scheduler": dict(TINY_FLUX_MODELS[loc.kind].scheduler), "vae": dict(FLUX_VAE_CONFIG)}
    if loc.kind == "toy":
        from .toy import scheduler_config, toy_meta, vae_config

        return {"scheduler": scheduler_config(), "vae": vae_config(toy_meta())}
    assert loc.folder is not None
    configs = {}
    for name, rel in (("scheduler", SCHEDULER_CONFIG_FILE), ("vae", "vae/config.json")):
        try:
            configs[name] = json.loads((loc.folder / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {loc.folder / rel}: {exc}",
                             hint="the model folder must hold scheduler/ and vae/ configs") from None
    return configs


def model_family(model: ModelSpec, spec_dir: Path) -> str:
    """The family name (``sd1``, ``sd2``, ``sdxl``: :mod:`caspec.families`), read from configs (no weights loaded)."""
    loc = locate_model(model, spec_dir)
    if loc.kind in EMBEDDED:
        return embedded_family(loc.kind)
    assert loc.folder is not None
    return folder_family(loc.folder)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass(eq=False)
class Pipe:
    """A loaded model of any family (:mod:`caspec.families`). Shared per process: treat as read-only.

    Families with a second text encoder also have ``tokenizer_2``/``text_encoder_2`` (None otherwise). ``expansions`` maps a
    multi-vector pseudo-word to the sub-tokens it stands for in prompts (``<w>`` -> ``<w> <w>_1 <w>_2``,
    diffusers' convention); training and :func:`caspec.assets.format.apply_asset` fill it."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    scheduler: Any  # a template; samplers build their own copy from its config
    device: Any  # torch.device
    dtype: Any  # torch dtype of the denoiser and text encoders (the VAE is fp32)
    resolution: int  # native square size in pixels
    unet: Any = None  # the denoiser of UNet families
    transformer: Any = None  # the denoiser of DiT families (FLUX.1)
    identity: dict[str, Any] = field(default_factory=dict)
    family: str = "sd1"
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is all zeros, not encoded ""
    expansions: dict[str, list[str]] = field(default_factory=dict)
    step_hook: Any = None  # called with t/T before each denoiser call of a sampler (compose's LoRA windows)

    @property
    def kind(self) -> families.Family:
        """This model's :class:`~caspec.families.base.Family`."""
        return families.get(self.family)

    @property
    def text_encoders(self) -> list[tuple[str, Any, Any]]:
        """``(component, tokenizer, text encoder)`` for each text encoder, in the family's order."""
        kind = self.kind
        return [(comp, getattr(self, kind.tokenizers[comp]), getattr(self, comp)) for comp in kind.text_encoders]

    @property
    def denoiser(self) -> Any:
        """The UNet (or a DiT family's transformer)."""
        return getattr(self, self.kind.denoiser)

    @property
    def lora_modules(self) -> list[tuple[str, Any]]:
        """``(component, module)`` for every component LoRA can adapt: the text encoders, then the denoiser."""
        return [(comp, getattr(self, comp)) for comp in self.kind.lora_components]

    def trained_lora_modules(self, cfg: Any = None) -> list[tuple[str, Any]]:
        """``(component, module)`` that phase 2 puts LoRA on with training settings ``cfg`` (FLUX.1: T5 only
        with ``t5_lora``)."""
        return [(comp, getattr(self, comp)) for comp in self.kind.trained_components(cfg)]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_dtype(self) -> Any:
        return next(self.vae.parameters()).dtype


_PIPES: dict[str, Pipe] = {}
_PIPES_LOCK = threading.Lock()


def weight_variant(sub: Path) -> str | None:
    """``fp16`` when a component folder holds only fp16-variant weights."""
    names = [p.name for p in sub.iterdir()] if sub.is_dir() else []
    plain = [n for n in names if n.endswith((".safetensors", ".bin")) and ".fp16." not in n]
    fp16 = [n for n in names if ".fp16." in n]
    return "fp16" if fp16 and not plain else None


def load_pipeline(model: ModelSpec, spec_dir: Path, *, fresh: bool = False) -> Pipe:
    """Load ``model`` (cached per process: the same identity and device give the same object).

    ``fresh=True`` bypasses the cache: it returns a newly loaded, independent :class:`Pipe` (neither
    taken from nor put into the cache) that the caller may mutate, e.g. to train it."""
    from . import quiet_libraries

    quiet_libraries()
    identity = model_identity(model, spec_dir)
    device = resolve_device(model)
    if fresh:
        return _load(model, spec_dir, identity, device)
    cache_key = json.dumps(identity, sort_keys=True) + "|" + device
    with _PIPES_LOCK:
        pipe = _PIPES.get(cache_key)
        if pipe is None:
            pipe = _load(model, spec_dir, identity, device)
            _PIPES[cache_key] = pipe
        return pipe


def clear_pipeline_cache() -> None:
    """Forget every loaded pipeline (tests, or to free memory)."""
    with _PIPES_LOCK:
        _PIPES.clear()


def _load(model: ModelSpec, spec_dir: Path, identity: dict[str, Any], device_name: str) -> Pipe:
    loc = locate_model(model, spec_dir)
    name = model.base
    try:
        folder = (ensure_tiny(loc.kind) if loc.kind in TINY_MODELS else ensure_toy() if loc.kind == "toy"
                  else ensure_tiny_flux(loc.kind) if loc.kind in TINY_FLUX_MODELS else loc.folder)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot build the embedded `{loc.kind}` model: {type(exc).__name__}: {exc}",
                         hint=f"check that the cache folder {cache_root()} is writable (or set CASPEC_CACHE)") from None
    assert folder is not None
    try:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot import the ML stack: {type(exc).__name__}: {exc}",
                         hint="reinstall caspec's pinned dependencies (torch, diffusers, transformers)") from None

    if device_name == "cuda" and not torch.cuda.is_available():
        raise ModelError("`model.device: cuda` was asked for but CUDA is not available",
                         hint="use `device: auto` or `cpu`")
    device = torch.device(device_name)
    dtype = getattr(torch, _DTYPE_NAMES[identity["dtype"]])
    family = families.get(embedded_family(loc.kind) if loc.kind in EMBEDDED else folder_family(folder))
    part = "?"

    def at(name: str) -> None:
        nonlocal part
        part = name

    try:
        parts = family.load_parts(folder, dtype, at)
        at("device")
        for module in parts.values():
            if hasattr(module, "to") and hasattr(module, "eval"):
                module.to(device)
                module.eval()
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"cannot load the {part} of model `{name}` from {folder}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint=f"the folder must be a complete {family.title} diffusers folder "
            f"({', '.join(family.folders)}); re-download it, or use `model: tiny`",
        ) from None
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return Pipe(**parts, device=device, dtype=dtype, resolution=family.native_resolution(folder), identity=identity,
                family=family.name, force_zeros_for_empty_prompt=family.empty_negative_is_zeros(index))


__all__ = ["Pipe", "ModelLocation", "locate_model", "model_identity", "weights_identity", "identity_differences",
           "loaded_files", "component_weight_files", "native_resolution", "model_family", "model_configs",
           "load_pipeline", "clear_pipeline_cache", "is_hub_id", "EMBEDDED", "embedded_folder", "resolve_device", "resolve_dtype", "RUN_FIELDS"]
