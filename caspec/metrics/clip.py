"""A CLIP model for the paper's metrics (section 4.1) and for automatic selection: which one
(:class:`ClipSpec`), whether its weights can be found (:func:`check_weights`, pure), what enters cache keys
(:func:`clip_identity`), and loading it (:func:`load_clip`) to embed images and texts.

A spec names an open_clip architecture (``ViT-B-32``, ..., ``caspec-toy-clip`` (shipped weights, trained on
the shapes world) or ``caspec-tiny-clip`` (a small config for tests)) and where its weights come from:

* ``pretrained``: an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...). Resolved as open_clip does
  (``download_pretrained``: the tag's ``hf_hub`` repo id and file name, a ``.safetensors`` alternative first),
  but only from the local Hugging Face cache (``huggingface_hub.try_to_load_from_cache``, HF_HUB_CACHE):
  caspec never downloads. A tag with only a ``url`` is looked for in open_clip's own cache (``~/.cache/clip``);
* ``checkpoint``: a local state-dict file (``.safetensors``, or a ``torch.save`` file read with
  ``weights_only=True``);
* ``pretrained: random`` (:data:`RANDOM`): random weights from the architecture config, initialised from a
  fixed seed, so the same spec always gives the same embeddings. Meaningless as a metric; every output made
  with them says so (:func:`is_random`, :func:`weights_note`). Never chosen silently: a spec that names no
  weights gets an error (:func:`check_weights`), except that :func:`for_spec` gives random weights to the
  embedded ``tiny``/``toy`` diffusion models, whose images are not real either.

Importing this module is cheap: open_clip (seconds to import, and it imports torch) is imported, and caspec's
configs are registered with ``open_clip.add_model_config``, on the first load (or :func:`register_configs`).
Checking weights reads open_clip's table of pretrained tags from its source file without importing it
(:func:`pretrained_cfg`), so that planning stays free of torch.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import functools
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
RANDOM = "random"  # `pretrained: random`: random weights, asked for by name
EMBEDDED_MODELS = ("tiny", "toy", "tiny-xl", "tiny-v", "tiny-flux", "tiny-flux-schnell")  # diffusion models whose CLIP may default to random weights
DEFAULT_BATCH_SIZE = 32
_SCHEMAS = ("hf-hub:", "local-dir:")
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # open_clip.constants: a tag's default file on the hub


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP: an open_clip model name, and its weights: a pretrained tag (or ``random``) or a local
    checkpoint file. Neither is allowed only for a model whose weights caspec ships (the toy CLIP)."""

    model: str = "ViT-B-32"
    pretrained: str | None = None
    checkpoint: str | None = None


class ClipWeightsError(ModelError):
    """A CLIP whose weights cannot be found; ``field`` names the spec setting at fault (``model``,
    ``pretrained`` or ``checkpoint``) so that the spec loader can point at it."""

    def __init__(self, message: str, hint: str | None = None, field: str = "pretrained"):
        super().__init__(message, hint)
        self.field = field


def is_random(spec: ClipSpec) -> bool:
    """Whether ``spec`` means random weights (``pretrained: random``)."""
    return (spec.pretrained or "").lower() == RANDOM


def for_spec(model: str, pretrained: str | None, checkpoint: str | None, base: str | None) -> ClipSpec:
    """The CLIP a spec's settings mean, for a spec whose diffusion model is ``base``.

    With the embedded ``tiny``/``toy`` models, naming no weights means random weights (outputs say so);
    with any other model it stays "no weights", which :func:`check_weights` refuses.
    """
    spec = ClipSpec(model, pretrained or None, checkpoint or None)
    if (base or "tiny") in EMBEDDED_MODELS and not spec.pretrained and not spec.checkpoint \
            and _shipped_weights(spec) is None:
        return ClipSpec(model, RANDOM, None)
    return spec


def weights_note(spec: ClipSpec) -> str | None:
    """A warning for outputs made with random weights (None for real weights)."""
    if not is_random(spec):
        return None
    return (f"CLIP `{spec.model}` has random weights (seed {INIT_SEED}): its scores are meaningless, "
            "fit only for tests and dry runs")


# ---------------------------------------------------------------------------------------------
# hints


def _checkpoint_hint(model: str) -> str:
    return (
        f"point `checkpoint` at a local state-dict file for `{model}` (.safetensors, or a torch.save'd "
        "state dict), e.g. `torch.save(model.state_dict(), 'clip.pt')` on a machine that has the weights; "
        f"or `pretrained: {RANDOM}` for a quick (meaningless) offline run"
    )


def _offline_hint(model: str, tag: str, repo: str | None = None, filename: str | None = None) -> str:
    fetch = (f"`hf download {repo} {filename}`" if repo and filename else
             f"`python -c \"import open_clip; open_clip.create_model_and_transforms('{model}', pretrained='{tag}')\"`")
    return (
        f"caspec reads CLIP weights from the local Hugging Face cache only ({_hub_cache()}): on a machine with "
        f"network run {fetch}, copy its cache folder{f' `{_repo_folder(repo)}`' if repo else ''} into this "
        "cache (or point HF_HUB_CACHE at a copy); or " + _checkpoint_hint(model)
    )


def _no_weights_hint(model: str) -> str:
    tags = list_tags(model)
    example = next((t for t in ("laion2b_s34b_b79k", "openai") if t in tags), tags[0] if tags else None)
    named = f"`pretrained: {example}`" if example else "`pretrained: <tag>`"
    known = f" (tags of `{model}`: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''})" if tags else ""
    hub = _hub_files(pretrained_cfg(model, example)) if example else None
    fetch = f"`hf download {hub[0]} {hub[1][0]}`" if hub else "`hf download REPO FILE`"
    return (f"name the weights: {named}{known}, with the weights in the local Hugging Face cache "
            f"({_hub_cache()}; caspec never downloads: run {fetch} on a machine with network and copy the "
            f"cache folder here), or `checkpoint: path/to/clip.safetensors`; `pretrained: {RANDOM}` for "
            "meaningless random weights")


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
# pretrained tags, resolved from the local cache (found without importing open_clip or torch)


def _open_clip_file(name: str) -> Path | None:
    folder = _builtin_config_dir()
    return None if folder is None else folder.parent / name


def _exec_without_imports(path: Path, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run a module's source with its top-level imports (and ``try: import ...``) left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    def is_import(node: ast.stmt) -> bool:
        return isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.Try) and any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body))
    tree.body = [node for node in tree.body if not is_import(node)]
    exec(compile(tree, str(path), "exec"), namespace)  # noqa: S102 - open_clip's own source, imports removed
    return namespace


@functools.lru_cache(maxsize=1)
def _pretrained_module() -> dict[str, Any]:
    """open_clip's ``pretrained`` module as a namespace: its table ``_PRETRAINED`` and its functions.

    open_clip's package imports torch (seconds), and planning must not; its ``pretrained.py`` only needs its
    ``constants`` at import, so it is run here from source without its imports (a test checks that the table
    equals open_clip's own). If open_clip's layout changes, the module itself is imported instead.
    """
    constants, pretrained = _open_clip_file("constants.py"), _open_clip_file("pretrained.py")
    try:
        assert constants is not None and pretrained is not None
        ns = _exec_without_imports(constants, {"__name__": "caspec_open_clip_constants"})
        ns.update({"__name__": "caspec_open_clip_pretrained", "copy": __import__("copy"), "hashlib": hashlib,
                   "os": os, "urllib": __import__("urllib"), "warnings": __import__("warnings"),
                   "partial": functools.partial, "Dict": dict, "Iterable": Iterable, "Optional": Any, "Union": Any,
                   "tqdm": None, "hf_hub_download": None, "_has_hf_hub": True, "_has_safetensors": True,
                   "__version__": _open_clip_version()})
        ns = _exec_without_imports(pretrained, ns)
        if isinstance(ns.get("_PRETRAINED"), dict) and callable(ns.get("get_pretrained_cfg")):
            return ns
    except Exception:  # noqa: BLE001 - fall back to open_clip itself
        pass
    if util.find_spec("open_clip") is None:  # pragma: no cover - open_clip is a dependency
        return {"_PRETRAINED": {}, "get_pretrained_cfg": lambda m, t: {}, "_get_safe_alternatives": lambda f: ()}
    import open_clip.pretrained as real  # pragma: no cover - only if the source layout changed

    return vars(real)


def pretrained_table() -> dict[str, dict[str, Any]]:
    """open_clip's table of pretrained tags (model -> tag -> config), as caspec reads it (the same object
    each call: registering a tag in it, e.g. in a test, is seen by :func:`pretrained_cfg`)."""
    return _pretrained_module()["_PRETRAINED"]


def pretrained_cfg(model: str, tag: str) -> dict[str, Any]:
    """open_clip's config of pretrained tag ``tag`` of ``model`` (``{}`` when there is none)."""
    return dict(_pretrained_module()["get_pretrained_cfg"](model.replace("/", "-"), tag) or {})


def list_tags(model: str) -> list[str]:
    """The pretrained tags open_clip knows for ``model``."""
    return list(pretrained_table().get(model.replace("/", "-"), {}))


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _repo_folder(repo: str | None) -> str:
    return f"models--{(repo or '').replace('/', '--')}"


@dataclass(frozen=True)
class PretrainedFile:
    """Where a pretrained tag's weights are: the file, and the hub repo id, file name and snapshot commit
    (None for a tag downloaded from a plain URL into open_clip's cache)."""

    path: Path
    repo: str | None = None
    filename: str | None = None
    revision: str | None = None


def _hub_files(cfg: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(repo id, file names to try in order) of a tag's ``hf_hub`` entry, as open_clip's
    ``download_pretrained`` reads it: ``org/name/file`` or ``org/name/`` (the default file), with the
    ``.safetensors`` alternatives first."""
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return None
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    safe = list(_pretrained_module()["_get_safe_alternatives"](filename))
    return repo, [*safe, filename]


def find_pretrained(model: str, tag: str) -> PretrainedFile:
    """The cached weights of ``tag`` for ``model``; a :class:`ClipWeightsError` with a hint when the tag is
    unknown or its weights are not in the local cache. Pure: looks for files, loads nothing."""
    cfg = pretrained_cfg(model, tag)
    if not cfg:
        if os.path.isfile(tag):
            raise ClipWeightsError(f"`pretrained: {tag}` is a file, not an open_clip tag",
                                   hint="put the file in `checkpoint` instead (its sha256 then enters cache keys)")
        tags = list_tags(model)
        raise ClipWeightsError(
            f"open_clip has no pretrained tag `{tag}` for CLIP model `{model}`",
            hint=(f"known tags: {', '.join(tags)}; or " if tags else "") + _checkpoint_hint(model))
    if cfg.get("file"):
        return PretrainedFile(Path(cfg["file"]))
    hub = _hub_files(cfg)
    if hub is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, names = hub
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                path = Path(found)
                return PretrainedFile(path, repo, name, path.parent.name)
        raise ClipWeightsError(
            f"the `{tag}` weights of CLIP model `{model}` are not in the local Hugging Face cache "
            f"(looked for {' or '.join(f'`{repo}/{n}`' for n in names)} in {_hub_cache()})",
            hint=_offline_hint(model, tag, repo, names[0]))
    url = cfg.get("url") or ""
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if url and path.is_file():
        return PretrainedFile(path)
    raise ClipWeightsError(f"the `{tag}` weights of CLIP model `{model}` are not in open_clip's cache ({path})",
                           hint=_offline_hint(model, tag))


def check_weights(spec: ClipSpec, spec_dir: Path | None = None) -> None:
    """Refuse, before anything runs, a CLIP whose weights cannot be found: no weights named (and none
    shipped), an unknown tag, a tag not in the local cache, a missing checkpoint file; and an unknown
    model. Pure (no torch, no weights loaded); raises :class:`ClipWeightsError` naming the field at fault."""
    _check_spec(spec)
    try:
        _model_config(spec.model)
    except ModelError as exc:
        raise ClipWeightsError(exc.message, exc.hint, field="model") from None
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        path = path if path.is_absolute() or spec_dir is None else spec_dir / path
        if not path.is_file():
            raise ClipWeightsError(f"no CLIP checkpoint file `{spec.checkpoint}` ({path})",
                                   hint="the checkpoint path is relative to the spec file; "
                                   + _checkpoint_hint(spec.model),
                                   field="checkpoint")
        return
    if is_random(spec) or _shipped_weights(spec) is not None:
        return
    if not spec.pretrained:
        raise ClipWeightsError(f"CLIP `{spec.model}` has no weights: no `pretrained` tag, no `checkpoint`",
                               hint=_no_weights_hint(spec.model))
    find_pretrained(spec.model, spec.pretrained)


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
        raise ClipWeightsError("no CLIP model named", hint="set `model`, e.g. `ViT-B-32`", field="model")
    if spec.pretrained and spec.checkpoint:
        raise ClipWeightsError(
            f"CLIP `{spec.model}` has both `pretrained: {spec.pretrained}` and `checkpoint: {spec.checkpoint}`",
            hint="give one: a pretrained tag, or a local checkpoint file",
            field="checkpoint",
        )


def _checkpoint_sha256(path: Path) -> str:
    """sha256 of ``path`` through caspec's digest cache (by path, size and mtime; files changed in the last
    two seconds are hashed afresh: :func:`caspec.store.hashing.cached_sha256`)."""
    from ..models.load import DIGESTS_FILE
    from ..models.tiny import cache_root
    from ..store.hashing import cached_sha256

    return cached_sha256(path, cache_root() / DIGESTS_FILE)


def _open_clip_version() -> str:
    try:
        return metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        return "unknown"


def clip_identity(spec: ClipSpec, hash_checkpoint: bool = True) -> dict[str, Any]:
    """What decides the embeddings of ``spec``, for cache keys. Pure: loads no weights, imports no torch.

    Model name, the sha256 of its architecture config, the pretrained tag with the hub repo, file and
    snapshot commit it resolves to in the local cache, the checkpoint's sha256 (cached by path, size and
    mtime), the seed of random weights, open_clip's version. Weights that cannot be found raise
    :class:`ClipWeightsError` (see :func:`check_weights`). ``hash_checkpoint=False`` leaves a ``checkpoint``
    file out (a step hashes it as one of its input files; its path may be relative to the spec).
    """
    if spec.checkpoint and not hash_checkpoint:
        _check_spec(spec)
        _model_config(spec.model)
    else:
        check_weights(spec)
    cfg = _model_config(spec.model)
    ident: dict[str, Any] = {
        "model": spec.model,
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest(),
        "pretrained": RANDOM if is_random(spec) else (spec.pretrained or None),
        "checkpoint_sha256": (_checkpoint_sha256(_checkpoint_path(spec))
                              if (spec.checkpoint and hash_checkpoint) or _shipped_weights(spec) else None),
        "open_clip": _open_clip_version(),
    }
    if spec.checkpoint and not hash_checkpoint:
        del ident["checkpoint_sha256"]
    if spec.pretrained and not is_random(spec) and not spec.checkpoint:
        found = find_pretrained(spec.model, spec.pretrained)
        ident["weights"] = ({"repo": found.repo, "file": found.filename, "revision": found.revision}
                            if found.repo else {"sha256": _checkpoint_sha256(found.path)})
    if is_random(spec):
        ident["init_seed"] = INIT_SEED
        ident["random_weights"] = True
    return ident


# ---------------------------------------------------------------------------------------------
# CLIP in steps (select by clip, eval)


def step_clip_params(settings: Any, base: str | None) -> dict[str, Any]:
    """The CLIP part of a step's cache key, from its `clip` settings (``model``, ``pretrained``,
    ``checkpoint``) and the spec's diffusion model ``base`` (see :func:`for_spec`): model, tag, whether a
    checkpoint is used (the step hashes that file as an input) and :func:`clip_identity` (which finds the
    weights, or raises :class:`ClipWeightsError`)."""
    cs = for_spec(settings.model, settings.pretrained, settings.checkpoint, base)
    return {"model": cs.model, "pretrained": cs.pretrained, "checkpoint": bool(cs.checkpoint),
            "clip": clip_identity(cs, hash_checkpoint=False)}


def weights_info(model: str, pretrained: str | None) -> dict[str, Any]:
    """What a step's outputs say about its CLIP's weights: ``random_weights``, and a ``warning`` for random ones."""
    spec = ClipSpec(model, pretrained)
    note = weights_note(spec)
    return {"random_weights": is_random(spec), **({"warning": note} if note else {})}


def load_step_clip(params: dict[str, Any], checkpoint: Path | None, model: Any) -> Clip:
    """A step's CLIP (``params`` from :func:`step_clip_params`; ``checkpoint``: the resolved input file),
    on the device the spec's diffusion model ``model`` runs on: CUDA when that is on CUDA."""
    from ..models.load import resolve_device

    spec = ClipSpec(params["model"], params["pretrained"], str(checkpoint) if checkpoint else None)
    return load_clip(spec, device=resolve_device(model))


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


def _preprocess_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """The image preprocessing a pretrained tag was trained with (what open_clip merges from its config)."""
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}
    return {arg: cfg[k] for k, arg in keys.items() if cfg.get(k) is not None}


def _weights_file(spec: ClipSpec) -> tuple[Path | None, dict[str, Any]]:
    """(file to load into the model, create_model_and_transforms kwargs) for ``spec``."""
    if spec.checkpoint or _shipped_weights(spec):
        return _checkpoint_path(spec), {"pretrained_text": False}
    if is_random(spec):
        return None, {"pretrained_text": False}  # random init: no base text-tower download
    assert spec.pretrained
    cfg = pretrained_cfg(spec.model, spec.pretrained)
    found = find_pretrained(spec.model, spec.pretrained)
    kwargs = {"pretrained_text": False, "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
              **_preprocess_overrides(cfg)}
    return found.path, kwargs


def _load(spec: ClipSpec, device: str) -> Clip:
    identity = clip_identity(spec)  # validates the name and finds the weights first (cheap errors)
    path, kwargs = _weights_file(spec)
    oc = register_configs()
    import torch

    name = spec.model.replace("/", "-")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init():  # a fixed seed; the caller's RNG untouched
            torch.manual_seed(INIT_SEED)
            model, _, preprocess = oc.create_model_and_transforms(name, pretrained=None, device="cpu", **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one error with a hint
        raise ModelError(f"cannot build CLIP model `{spec.model}`: {_first_line(exc)}",
                         hint=_checkpoint_hint(spec.model)) from exc

    if path is not None:
        try:
            oc.load_checkpoint(model, str(path), strict=True, weights_only=True, device="cpu")
        except Exception as exc:  # noqa: BLE001
            what = f"checkpoint `{spec.checkpoint}`" if spec.checkpoint else f"weights `{spec.pretrained or path}` ({path})"
            raise ModelError(
                f"cannot load CLIP {what} into `{spec.model}`: {_first_line(exc)}",
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
    "ClipSpec", "Clip", "ClipWeightsError", "PretrainedFile", "load_clip", "clear_clip_cache", "clip_identity",
    "check_weights", "find_pretrained", "pretrained_cfg", "pretrained_table", "list_tags", "for_spec", "is_random",
    "weights_note", "step_clip_params", "weights_info", "load_step_clip", "register_configs", "TINY_CLIP", "TOY_CLIP",
    "INIT_SEED", "RANDOM", "CONFIG_DIR", "EMBEDDED_MODELS",
]
