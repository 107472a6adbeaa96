"""A CLIP model for the paper's metrics (section 4.1): which one (:class:`ClipSpec`), what enters cache
keys (:func:`clip_identity`), and loading it (:func:`load_clip`) to embed images and texts.

A spec names an open_clip architecture (``ViT-B-32``, ..., or ``caspec-tiny-clip``, the small config
shipped in ``caspec/metrics/configs`` for tests) and where its weights come from:

* ``pretrained``: an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...), resolved from the local
  Hugging Face cache when offline;
* ``checkpoint``: a local state-dict file (``.safetensors``, or a ``torch.save`` file read with
  ``weights_only=True``);
* neither: random weights from the architecture config, initialised from a fixed seed, so that the
  same spec always gives the same embeddings (what offline tests use; useless as a real metric).

Importing this module is cheap: open_clip (seconds to import) is imported, and caspec's configs are
registered with ``open_clip.add_model_config``, on the first load (or :func:`register_configs`).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_CLIP = "caspec-tiny-clip"
TOY_CLIP = "caspec-toy-clip"
TOY_CLIP_WEIGHTS = Path(__file__).resolve().parent.parent / "toyworld" / "weights" / "clip.safetensors"
INIT_SEED = 20240521  # random-init weights: the same spec gives the same model, run after run
DEFAULT_BATCH_SIZE = 32
_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP: an open_clip model name, and a pretrained tag or a local checkpoint file (or neither)."""

    model: str = "ViT-B-32"
    pretrained: str | None = None
    checkpoint: str | None = None


# ---------------------------------------------------------------------------------------------
# hints


def _checkpoint_hint(model: str) -> str:
    return (
        f"point `checkpoint` at a local state-dict file for `{model}` (.safetensors, or a torch.save'd "
        "state dict), e.g. `torch.save(model.state_dict(), 'clip.pt')` on a machine that has the weights; "
        f"or use `model: {TINY_CLIP}` without weights for a quick (meaningless) offline run"
    )


def _offline_hint(model: str, tag: str) -> str:
    return (
        f"download them once on a machine with network (`python -c \"import open_clip; "
        f"open_clip.create_model_and_transforms('{model}', pretrained='{tag}')\"`) and copy the Hugging Face "
        "cache here (or set HF_HUB_CACHE to it); or " + _checkpoint_hint(model)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."


# ---------------------------------------------------------------------------------------------
# configs (found without importing open_clip)


def _builtin_config_dir() -> Path | None:
    found = util.find_spec("open_clip")  # a top-level package: located, not imported
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / "model_configs"


def _config_files() -> dict[str, Path]:
    """Model name -> config file: open_clip's built-ins, then caspec's (which win, as in open_clip)."""
    out: dict[str, Path] = {}
    for folder in (_builtin_config_dir(), CONFIG_DIR):
        if folder is not None and folder.is_dir():
            out.update({p.stem: p for p in folder.glob("*.json")})
    return out


def _model_config(model: str) -> dict[str, Any]:
    """The architecture config of ``model`` (a ModelError naming close matches if there is none)."""
    if model.startswith(_SCHEMAS):
        raise ModelError(
            f"CLIP model `{model}`: `hf-hub:` and `local-dir:` models are not supported",
            hint="name an open_clip architecture (e.g. `ViT-B-32`) and put its weights in `checkpoint`",
        )
    name = model.replace("/", "-")  # as open_clip does
    files = _config_files()
    if name in files:
        try:
            cfg = json.loads(files[name].read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the config of CLIP model `{model}` ({files[name]}): {_first_line(exc)}") from exc
        if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            return cfg
    if "open_clip" in sys.modules:  # configs someone registered in this process with add_model_config
        cfg = sys.modules["open_clip"].get_model_config(name)
        if cfg is not None:
            return cfg
    close = difflib.get_close_matches(name, list(files), n=5, cutoff=0.6)
    raise ModelError(
        f"unknown CLIP model `{model}`: open_clip has no architecture config of that name",
        hint=(f"did you mean {', '.join(f'`{c}`' for c in close)}? " if close else "")
        + f"use an open_clip model name such as `ViT-B-32` or `ViT-L-14` (or `{TINY_CLIP}` for tests), "
        "with `pretrained: <tag>` or `checkpoint: <file>`",
    )


# ---------------------------------------------------------------------------------------------
# identity


def _shipped_weights(spec: ClipSpec) -> Path | None:
    """The weights caspec ships for ``spec`` (the toy CLIP), used when no tag or checkpoint is given."""
    if spec.model == TOY_CLIP and not spec.pretrained and not spec.checkpoint:
        return TOY_CLIP_WEIGHTS
    return None


def _checkpoint_path(spec: ClipSpec) -> Path:
    shipped = _shipped_weights(spec)
    if shipped is not None:
        if not shipped.is_file():
            raise ModelError(f"the toy CLIP's weights are missing ({shipped})",
                             hint="reinstall caspec, or train them with `caspec toyworld train`")
        return shipped
    assert spec.checkpoint is not None
    path = Path(spec.checkpoint).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ModelError(f"CLIP checkpoint `{spec.checkpoint}` {what} ({path.absolute()})",
                         hint=_checkpoint_hint(spec.model))
    return path


def _check_spec(spec: ClipSpec) -> None:
    if not spec.model:
        raise ModelError("no CLIP model named", hint="set `model`, e.g. `ViT-B-32`")
    if spec.pretrained and spec.checkpoint:
        raise ModelError(
            f"CLIP `{spec.model}` has both `pretrained: {spec.pretrained}` and `checkpoint: {spec.checkpoint}`",
            hint="give one: a pretrained tag, or a local checkpoint file",
        )


def _sha256_file(path: Path) -> str:
    from ..store.hashing import sha256_file

    return sha256_file(path)


_RACY_NS = 2_000_000_000  # a file changed this recently may change again within one mtime tick


def _checkpoint_sha256(path: Path) -> str:
    """sha256 of ``path``, reusing caspec's digest cache (keyed by path, size and mtime_ns).

    Files modified in the last two seconds are always hashed afresh and never cached: file times are
    coarser than a nanosecond, so a quick rewrite of the same size could keep its mtime (git's "racy" case).
    """
    import time

    from ..models.load import DIGESTS_FILE, _read_digests, _write_digests
    from ..models.tiny import cache_root

    st = path.stat()
    key = str(path.resolve())
    cache_file = cache_root() / DIGESTS_FILE
    entry = _read_digests(cache_file).get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    digest = _sha256_file(path)
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        _write_digests(cache_file, {key: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}})
    return digest


def _open_clip_version() -> str:
    try:
        return metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        return "unknown"


def clip_identity(spec: ClipSpec) -> dict[str, Any]:
    """What decides the embeddings of ``spec``, for cache keys. Pure: loads no weights, imports no torch.

    Model name, the sha256 of its architecture config, the pretrained tag, the checkpoint's sha256
    (cached by path, size and mtime), the seed of random weights when there are none, open_clip's version.
    """
    _check_spec(spec)
    cfg = _model_config(spec.model)
    ident: dict[str, Any] = {
        "model": spec.model,
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest(),
        "pretrained": spec.pretrained or None,
        "checkpoint_sha256": (_checkpoint_sha256(_checkpoint_path(spec))
                              if spec.checkpoint or _shipped_weights(spec) else None),
        "open_clip": _open_clip_version(),
    }
    if not spec.pretrained and not spec.checkpoint and not _shipped_weights(spec):
        ident["init_seed"] = INIT_SEED
    return ident


# ---------------------------------------------------------------------------------------------
# open_clip, imported once, with caspec's configs registered

_REGISTER_LOCK = threading.Lock()
_registered = False


def register_configs() -> Any:
    """Import open_clip and register caspec's model configs with it (once); returns the module."""
    global _registered
    import open_clip

    with _REGISTER_LOCK:
        if not _registered:
            open_clip.add_model_config(CONFIG_DIR)
            _registered = True
    return open_clip


# ---------------------------------------------------------------------------------------------
# the loaded model


@dataclass(eq=False)
class Clip:
    """A loaded CLIP: L2-normalised image and text embeddings, computed in batches without gradients."""

    spec: ClipSpec
    model: Any
    preprocess: Callable[[Any], Any]
    tokenizer: Callable[[list[str]], Any]
    device: str
    identity: dict[str, Any] = field(default_factory=dict)
    batch_size: int = DEFAULT_BATCH_SIZE
    _dim: int | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        """The embedding width."""
        if self._dim is None:
            self._dim = int(self.embed_texts([""]).shape[1])
        return self._dim

    def embed_images(self, images: Sequence["Image.Image | str | os.PathLike[str]"],
                     batch_size: int | None = None) -> "torch.Tensor":
        """``[n, d]`` float32 CPU tensor of unit vectors; each image (PIL, or a path) preprocessed once."""
        import torch
        from PIL import Image as PILImage

        images = list(images)
        bs = max(1, int(batch_size or self.batch_size))
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                pixels = []
                for im in images[start:start + bs]:
                    if not isinstance(im, PILImage.Image):
                        with PILImage.open(im) as opened:
                            im = opened.convert("RGB")
                    pixels.append(self.preprocess(im))
                batch = torch.stack(pixels).to(self.device)
                out.append(self.model.encode_image(batch, normalize=True).float().cpu())
        if not out:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        return torch.cat(out)

    def embed_texts(self, texts: Iterable[str], batch_size: int | None = None) -> "torch.Tensor":
        """``[n, d]`` float32 CPU tensor of unit vectors (texts longer than the context are truncated)."""
        import torch

        texts = [str(t) for t in texts]
        bs = max(1, int(batch_size or self.batch_size))
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), bs):
                tokens = self.tokenizer(texts[start:start + bs]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        if not out:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        return torch.cat(out)


_CLIPS: dict[tuple[Any, ...], Clip] = {}
_CLIPS_LOCK = threading.Lock()


def load_clip(spec: ClipSpec, device: str = "cpu") -> Clip:
    """The CLIP of ``spec`` on ``device``, loaded once per process (per spec, device and checkpoint file).

    Every failure (unknown model, missing checkpoint, weights not available offline, a checkpoint that
    does not fit the architecture) is a :class:`~caspec.errors.ModelError` with a hint.
    """
    _check_spec(spec)
    stamp: tuple[Any, ...] = ()
    if spec.checkpoint or _shipped_weights(spec):
        st = _checkpoint_path(spec).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    key = (spec, str(device), stamp)
    with _CLIPS_LOCK:
        clip = _CLIPS.get(key)
        if clip is None:
            clip = _load(spec, str(device))
            _CLIPS[key] = clip
        return clip


def clear_clip_cache() -> None:
    """Forget loaded CLIP models (tests; freeing memory)."""
    with _CLIPS_LOCK:
        _CLIPS.clear()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's root-logger warning that a model was initialised randomly: caspec means it."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load(spec: ClipSpec, device: str) -> Clip:
    identity = clip_identity(spec)  # validates the name and the checkpoint path first (cheap errors)
    oc = register_configs()
    import torch

    name = spec.model.replace("/", "-")
    kwargs: dict[str, Any] = {}
    if spec.pretrained:
        tag_cfg = oc.pretrained.get_pretrained_cfg(name, spec.pretrained)
        if not tag_cfg:
            if os.path.isfile(spec.pretrained):
                raise ModelError(f"`pretrained: {spec.pretrained}` is a file, not an open_clip tag",
                                 hint="put the file in `checkpoint` instead (its sha256 then enters cache keys)")
            tags = oc.list_pretrained_tags_by_model(name)
            raise ModelError(
                f"open_clip has no pretrained tag `{spec.pretrained}` for CLIP model `{spec.model}`",
                hint=(f"known tags: {', '.join(tags)}; or " if tags else "") + _checkpoint_hint(spec.model),
            )
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))  # as the weights were trained
    else:
        kwargs["pretrained_text"] = False  # random init / checkpoint: no base text-tower download

    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init():  # a fixed seed; the caller's RNG untouched
            torch.manual_seed(INIT_SEED)
            model, _, preprocess = oc.create_model_and_transforms(
                name, pretrained=spec.pretrained or None, device="cpu", **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one error with a hint
        if spec.pretrained:
            raise ModelError(
                f"cannot load the `{spec.pretrained}` weights of CLIP model `{spec.model}` "
                f"(not in the local cache, or no network): {_first_line(exc)}",
                hint=_offline_hint(name, spec.pretrained),
            ) from exc
        raise ModelError(f"cannot build CLIP model `{spec.model}`: {_first_line(exc)}",
                         hint=_checkpoint_hint(spec.model)) from exc

    if spec.checkpoint or _shipped_weights(spec):
        path = _checkpoint_path(spec)
        try:
            oc.load_checkpoint(model, str(path), strict=True, weights_only=True, device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"cannot load CLIP checkpoint `{spec.checkpoint}` into `{spec.model}`: {_first_line(exc)}",
                hint=f"the file must hold a state dict of open_clip's `{spec.model}` (same architecture); "
                + _checkpoint_hint(spec.model),
            ) from exc

    try:
        tokenizer = oc.get_tokenizer(name)
        model = model.to(device).eval()
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot set up CLIP model `{spec.model}` on `{device}`: {_first_line(exc)}",
                         hint="check the device name (`cpu`, `cuda`), and that the tokenizer is available offline") from exc
    return Clip(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, device=device,
                identity=identity)


__all__ = [
    "ClipSpec", "Clip", "load_clip", "clear_clip_cache", "clip_identity", "register_configs",
    "TINY_CLIP", "TOY_CLIP", "INIT_SEED", "CONFIG_DIR",
]
