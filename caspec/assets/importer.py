"""Import a concept asset from the files :mod:`caspec.assets.export` writes (or the same formats from other tools).

``import_asset(src, out_dir, tokens=...)`` reads ``src`` and writes a caspec asset folder ``out_dir``
(``embeddings.safetensors``, ``lora.safetensors``, ``card.yaml``: :func:`caspec.assets.format.save_asset` and
:func:`~caspec.assets.format.write_card`). ``src`` may be

* a caspec asset folder (``embeddings.safetensors`` inside): copied;
* a ``diffusers`` export: ``pytorch_lora_weights.safetensors`` (rank and alpha from its
  ``lora_adapter_metadata`` header entry; without one, diffusers' convention ``alpha = rank``) plus
  textual-inversion files ``{token: tensor[1, d]}``;
* an ``a1111`` export: ``{"emb_params": tensor[n, d]}`` embeddings (the file name is the word) and/or a kohya
  LoRA file (``lora_unet_*`` / ``lora_te_*`` keys with ``.alpha``);
* a ``bundle``: one kohya LoRA file that also holds ``bundle_emb.<word>.string_to_param.*`` (or
  ``bundle_emb.<word>.clip_l`` / ``.clip_g``) embeddings;
* a single embedding file;
* SDXL files of all these kinds: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` embeddings (diffusers' SDXL
  pivotal tuning, A1111, ComfyUI), kohya SDXL LoRA (``lora_te1_`` / ``lora_te2_`` / SGM-named ``lora_unet_``),
  diffusers SDXL LoRA (``text_encoder_2.`` keys).

Multi-vector embeddings (``[n, d]``, A1111's ``num_vectors_per_token`` > 1) become words of ``n`` vectors.
The asset's family (SD 1.x / 2.x / SDXL) comes from the exporter's header, else from the files (two text
encoders: SDXL; width 1024: SD 2.x; else SD 1.x).

Files the exporter wrote carry a ``caspec`` header entry that restores the pseudo-words (with their angle
brackets), roles, initializer words, targets and the exact module paths behind kohya names. Without it, a
word ``shape1`` becomes the pseudo-word ``<shape1>`` and kohya names are mapped with diffusers' own converters.
``tokens`` renames: ``{name: pseudo-word to use}``, where a name is the pseudo-word as found (``<shape1>``) or
its bare word (``shape1``, the exported file name).

Pickled embeddings (``.pt`` / ``.bin``, e.g. A1111's ``{"string_to_param": {"*": t}, "name": ...}``) are read
ONLY with ``torch.load(..., weights_only=True)``: a pickle that needs anything beyond tensors and plain
containers is refused with :class:`UnsafeFileError` and never executed.

LoRA layers are stored with one rank and one alpha per asset. Layers whose alpha differs from the most common
one get ``alpha_layer / alpha`` folded into their ``lora_B``, so every layer's delta
``B @ A * alpha / rank`` is unchanged; mixed ranks are refused.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..fsutil import atomic_write_bytes
from .. import families
from ..families.base import TEXT_MODEL, clip_has_text_model
from .export import BUNDLE_PREFIX, EXPORT_FORMAT, META_KEY, word_for
from .format import COMPONENTS, EMBEDDINGS_FILE, load_asset, save_asset, write_card

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
PICKLE_SUFFIXES = (".pt", ".bin")
_KOHYA_STARTS = tuple(sorted({p for f in families.FAMILIES.values() for p in f.kohya_prefix.values()}))
_KOHYA_LAYER = re.compile(r"^(?P<name>lora_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
# embedding-file key -> text encoder, over every family that names its encoders (clip_l -> text_encoder, ...)
_ENCODER_OF = {key: enc for f in families.FAMILIES.values() for key, enc in f.embedding_file_keys.items()}
_BUNDLE_KEY = re.compile(r"^bundle_emb\.(?P<word>.+?)\.(?P<part>string_to_param\.\*|"
                         + "|".join(map(re.escape, sorted(_ENCODER_OF))) + ")$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


class UnsafeFileError(ValueError):
    """A pickled file that cannot be loaded without running code (refused, never executed)."""


@dataclass
class _Layer:
    comp: str
    module: str
    a: Any
    b: Any
    alpha: float


@dataclass
class _Found:
    """What the source files hold, before it becomes an asset."""

    # (word, {text-encoder component: tensor [n, d]}, info)
    embeddings: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    layers: list[_Layer] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # the caspec header of the LoRA/bundle file
    family: str | None = None  # what the files say (SDXL layer names), if anything
    formats: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# entry point


def import_asset(src: str | Path, out_dir: str | Path, *, tokens: Mapping[str, str] | None = None) -> Path:
    """Read ``src`` (a folder or file in any exported format) and write a caspec asset folder ``out_dir``."""
    src, out = Path(src), Path(out_dir)
    if not src.exists():
        raise ValueError(f"nothing to import: {src} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"import target {out} exists and is not an empty folder")
    if src.is_dir() and (src / EMBEDDINGS_FILE).is_file():
        return _copy_asset(src, out, dict(tokens or {}))
    files = sorted(p for p in src.iterdir() if _weight_file(p)) if src.is_dir() else [src]
    if not files:
        raise ValueError(f"{src} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    found = _Found(files=files)
    for path in files:
        _read_file(path, found)
    return _write(found, src, out, dict(tokens or {}))


def _weight_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in WEIGHT_SUFFIXES


# ---------------------------------------------------------------------------------------------
# reading files


def _read_file(path: Path, found: _Found) -> None:
    tensors, meta = _load_tensors(path)
    info = _caspec_info(meta)
    keys = list(tensors)
    if not keys:
        raise ValueError(f"{path} holds no tensors")
    lora_keys = [k for k in keys if not k.startswith(BUNDLE_PREFIX) and ("lora" in k.lower() or k.endswith(".alpha"))]
    own = _lora_family(info, lora_keys) if lora_keys else None
    if own is not None and _read_family_lora(path, tensors, meta, info, found, own):
        pass
    elif all(k.startswith(_KOHYA_STARTS) or k.startswith(BUNDLE_PREFIX) for k in keys):
        _read_kohya(path, tensors, info, found)
    elif all(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in keys):
        _read_diffusers_lora(path, tensors, meta, info, found)
    elif set(keys) <= set(_ENCODER_OF) and "clip_l" in keys:  # per-encoder embedding (SDXL, FLUX.1)
        found.embeddings.append((info.get("token") or path.stem, _per_encoder(path, tensors), info))
        family = _embedding_family(keys)
        found.family = found.family or (family.name if family else None)
        found.formats.append(f"{family.name if family else 'sdxl'}-embedding")
    elif "emb_params" in tensors and len(keys) == 1:
        found.embeddings.append((path.stem, {"text_encoder": tensors["emb_params"]}, info))
        found.formats.append("a1111")
    elif "string_to_param" in tensors:  # A1111 .pt: {"string_to_param": {"*": t}, "name": ...}
        params = tensors["string_to_param"]
        t = params.get("*") if isinstance(params, Mapping) else None
        if t is None and isinstance(params, Mapping) and len(params) == 1:
            t = next(iter(params.values()))
        if not _is_tensor(t):
            raise ValueError(f"{path}: `string_to_param` holds no embedding tensor")
        found.embeddings.append((path.stem, {"text_encoder": t}, info))
        found.formats.append("a1111")
    elif len(keys) == 1 and _is_tensor(tensors[keys[0]]):  # diffusers textual inversion {token: t}
        word = info.get("token") or keys[0]
        found.embeddings.append((word, {"text_encoder": tensors[keys[0]]}, info))
        found.formats.append("diffusers")
    else:
        raise ValueError(f"{path}: cannot tell what this file is (keys {keys[:4]}...): expected a LoRA "
                         "(diffusers or kohya layout) or a textual-inversion embedding")


def _is_tensor(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor)


def _load_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's tensors (safetensors, or a pickle read with ``weights_only=True``) and header metadata."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read {path} as safetensors: {type(exc).__name__}: {exc}") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path), {}
    raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(WEIGHT_SUFFIXES)})")


def _load_pickle(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only; code never runs."""
    import pickle

    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = f"it refers to `{m.group(1)}`" if m else "it is not a plain tensor pickle"
        raise UnsafeFileError(
            f"refusing to load {path}: {why}, and unpickling it could run arbitrary code. caspec reads .pt/.bin "
            "files only with torch.load(weights_only=True) (tensors and plain containers); if you trust the file, "
            "convert it to safetensors yourself") from None
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if _is_tensor(data):
        return {path.stem: data}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, found a {type(data).__name__}")
    return dict(data)


def _caspec_info(meta: Mapping[str, str]) -> dict[str, Any]:
    raw = meta.get(META_KEY)
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) and info.get("format") == EXPORT_FORMAT else {}


def _read_kohya(path: Path, tensors: Mapping[str, Any], info: dict[str, Any], found: _Found) -> None:
    groups: dict[str, dict[str, Any]] = {}
    bundle = _read_bundle(path, tensors, found)
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            continue
        m = _KOHYA_LAYER.match(key)
        if m is None:
            raise ValueError(f"{path}: unsupported kohya key {key!r} (plain LoRA only: lora_down / lora_up / alpha)")
        groups.setdefault(m["name"], {})[m["part"]] = value
    family = _lora_family(info, groups)
    if family is not None:
        found.family = family.name
    modules = dict(info.get("modules")) if isinstance(info.get("modules"), Mapping) else {}
    for name, parts in sorted(groups.items()):
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: layer {name} lacks lora_down or lora_up")
    unmapped = {n: p for n, p in groups.items() if n not in modules}
    if unmapped:
        layout = info.get("unet_layout") if isinstance(info.get("unet_layout"), Mapping) else None
        try:
            modules.update((family or families.get("sd1")).kohya_modules(unmapped, layout))
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise many kinds
            raise ValueError(f"{path}: {exc}") from None
    for name, parts in sorted(groups.items()):
        a, b = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = a.shape[0]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        comp, module = modules[name].split(":", 1)
        found.layers.append(_Layer(comp, module, a, b, alpha))
    if groups or info:
        found.info = found.info or info
    found.formats.append("bundle" if bundle else "a1111")


def _read_bundle(path: Path, tensors: Mapping[str, Any], found: _Found) -> dict[str, dict[str, Any]]:
    """The embeddings a LoRA file bundles (``bundle_emb.<word>.<part>``) into ``found``; returns them by word."""
    bundle: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            m = _BUNDLE_KEY.match(key)
            if m is None:
                raise ValueError(f"{path}: unknown bundled-embedding key {key!r}")
            bundle.setdefault(m["word"], {})[m["part"]] = value
    for word, parts in bundle.items():
        found.embeddings.append((word, _per_encoder(path, parts), {}))
    return bundle


def _per_encoder(path: Path, parts: Mapping[str, Any]) -> dict[str, Any]:
    """Embedding-file keys (``clip_l``, ``clip_g``, ``t5``, ComfyUI's ``t5xxl``, A1111's ``string_to_param.*``) ->
    text encoder; aliases of one encoder must hold the same vectors."""
    out: dict[str, Any] = {}
    for key, value in parts.items():
        enc = _ENCODER_OF.get(key, "text_encoder")
        if enc in out and not (out[enc].shape == value.shape and bool((out[enc] == value).all())):
            raise ValueError(f"{path}: embedding keys for the same text encoder ({enc}) hold different vectors")
        out[enc] = value
    return out


def _embedding_family(keys: Any) -> Any:
    """The family whose embedding-file keys these are, when a key tells (``clip_g``: SDXL, ``t5``: FLUX.1)."""
    telling = set(keys) - {"clip_l"}
    if not telling:
        return None
    return next((f for f in families.DETECTION_ORDER if f.embedding_keys and telling <= set(f.embedding_file_keys)),
                None)


def _adapter_metadata(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` header entry (``{"unet.r": 4, "unet.lora_alpha": 8.0, ...}``), or {}."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError):
        raise ValueError(f"{path}: unreadable lora_adapter_metadata header entry") from None


def _read_family_lora(path: Path, tensors: Mapping[str, Any], meta: Mapping[str, str], info: dict[str, Any],
                      found: _Found, family: Any) -> bool:
    """A LoRA file (maybe with bundled embeddings) of a family that reads its own files (FLUX.1's naming styles);
    False when the family leaves it to the kohya / diffusers readers."""
    adapter = _adapter_metadata(path, meta)
    default_alpha = {k.removesuffix(".lora_alpha"): float(v) for k, v in adapter.items() if k.endswith(".lora_alpha")}
    lora = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
    try:
        layers = family.lora_layers(lora, default_alpha)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if layers is None:
        return False
    found.family = family.name
    found.layers += [_Layer(comp, module, a, b, alpha) for comp, module, a, b, alpha in layers]
    bundle = _read_bundle(path, tensors, found)
    found.info = found.info or info
    found.formats.append("bundle" if bundle else "kohya" if any(k.startswith("lora_unet_") for k in lora)
                         else "diffusers")
    return True


def _lora_family(info: Mapping[str, Any], names: Any) -> Any:
    """The family a LoRA file belongs to: the exporter's word, else the one whose layer names it uses (None:
    nothing family-specific, an SD 1.x / 2.x file)."""
    if info.get("family") in families.FAMILIES:
        return families.get(info["family"])
    names = list(names)
    return next((f for f in families.DETECTION_ORDER if f.claims_lora_names(names)), None)


def _read_diffusers_lora(path: Path, tensors: Mapping[str, Any], meta: Mapping[str, str], info: dict[str, Any],
                         found: _Found) -> None:
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    adapter = _adapter_metadata(path, meta)
    for comp in COMPONENTS:
        part = {k.removeprefix(f"{comp}."): v for k, v in tensors.items() if k.startswith(f"{comp}.")}
        if not part:
            continue
        if comp == "unet":
            peft = convert_unet_state_dict_to_peft(part)
        else:
            if any("_lora." in k for k in part):
                part = convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD)
            peft = convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS)
        cfg = {k.removeprefix(f"{comp}."): v for k, v in adapter.items() if k.startswith(f"{comp}.")}
        for module, (a, b) in _peft_pairs(peft, path).items():
            found.layers.append(_Layer(comp, module, a, b, _diffusers_alpha(cfg, module, a.shape[0])))
    family = _lora_family(info, list(tensors))
    if family is not None:
        found.family = family.name
    found.info = found.info or info
    found.formats.append("diffusers")


def _diffusers_alpha(cfg: Mapping[str, Any], module: str, rank: int) -> float:
    """The alpha diffusers would give ``module``: ``alpha_pattern``, else ``lora_alpha``, else the rank."""
    pattern = cfg.get("alpha_pattern") or {}
    for key, value in pattern.items():
        k = key.lstrip("^")
        if module == k or module.endswith("." + k) or re.fullmatch(key, module):
            return float(value)
    if "lora_alpha" in cfg:
        return float(cfg["lora_alpha"])
    return float(rank)


def _peft_pairs(peft: Mapping[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in peft.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unsupported LoRA key {key!r} (plain lora_A / lora_B weights only)")
        pairs.setdefault(m["module"], {})[m["part"]] = value
    out = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: module {module} lacks lora_A or lora_B")
        out[module] = (parts["lora_A"], parts["lora_B"])
    return out


# ---------------------------------------------------------------------------------------------
# writing the asset


def _te_path(module: str) -> str:
    """A text-encoder module path in this transformers' CLIPTextModel layout."""
    bare = module.removeprefix(TEXT_MODEL)
    return TEXT_MODEL + bare if clip_has_text_model() else bare


def _bare(token: str) -> str:
    """``<shape1>`` -> ``shape1`` (the name exported files use), or ``""``."""
    try:
        return word_for(token)
    except ValueError:
        return ""


def _default_token(word: str) -> str:
    if word.startswith("<") and word.endswith(">"):
        return word
    clean = re.sub(r"[^A-Za-z0-9]", "", word)
    if not clean:
        raise ValueError(f"cannot make a pseudo-word from {word!r}: pass tokens={{{word!r}: '<name>'}}")
    return f"<{clean}>"


def _write(found: _Found, src: Path, out: Path, renames: dict[str, str]) -> Path:
    import torch

    if not found.embeddings:
        raise ValueError(f"{src} holds no pseudo-word embeddings (a LoRA alone is not a concept asset)")
    info = found.info
    words = info.get("words") if isinstance(info.get("words"), Mapping) else {}
    by_word = {w: t for t, w in words.items()}
    entries = []  # (order, pseudo-word, vector [d], role, init word, pseudo-word as exported or None, name in src)
    used: set[str] = set()
    for word, t, tinfo in found.embeddings:
        src_tok = tinfo.get("token") or by_word.get(word)  # the pseudo-word as exported, when the header says
        natural = src_tok or _default_token(word)
        aliases = [a for a in dict.fromkeys([natural, word, _bare(natural)]) if a in renames]
        if len({renames[a] for a in aliases}) > 1:
            raise ValueError(f"tokens= renames {natural} twice: {', '.join(f'{a} -> {renames[a]}' for a in aliases)}")
        tok = renames[aliases[0]] if aliases else natural
        used.update(aliases)
        parts = {}
        for enc, x in t.items():
            if not _is_tensor(x) or x.ndim not in (1, 2) or x.numel() == 0 or (x.ndim == 2 and x.shape[0] > 16):
                raise ValueError(f"embedding {word!r} ({enc}) has shape {tuple(getattr(x, 'shape', ()))}: expected "
                                 "[d] or [n, d] with 1 to 16 vectors")
            parts[enc] = x.reshape(1, -1) if x.ndim == 1 else x
        if len({int(x.shape[0]) for x in parts.values()}) != 1:
            raise ValueError(f"embedding {word!r}: its text encoders hold different numbers of vectors "
                             f"({', '.join(f'{e}: {x.shape[0]}' for e, x in parts.items())})")
        t = parts
        order = tinfo.get("index")
        if order is None and src_tok in (info.get("tokens") or []):
            order = info["tokens"].index(src_tok)
        role = tinfo.get("role") or (info.get("roles") or {}).get(src_tok) or "imported"
        init = tinfo.get("init_word") or (info.get("init_words") or {}).get(src_tok) or ""
        entries.append((order if isinstance(order, int) else 10**6, tok, t, str(role), str(init), src_tok, word))
    unknown = sorted(set(renames) - used)
    if unknown:
        raise ValueError(f"tokens= names {unknown} match no embedding in {src} "
                         f"(found: {sorted({e[6] for e in entries} | {e[5] for e in entries if e[5]})})")
    entries.sort(key=lambda e: (e[0], e[1]))
    toks = [e[1] for e in entries]
    from ..spec.models import TOKEN, is_pseudo_word

    for e in entries:
        if not is_pseudo_word(e[1]):
            raise ValueError(f"{src}: pseudo-word {e[1]!r} (from {e[6]!r}) does not follow the grammar {TOKEN} "
                             "(angle brackets around letters, digits, `_`, `.`, `-`): refused, it could carry code into "
                             "snippets and prompts; rename it with import_asset(..., tokens={found: new})")

    dup = sorted({t for t in toks if toks.count(t) > 1})
    if dup:
        raise ValueError(f"{src}: pseudo-word(s) {dup} found twice; rename one with tokens=")
    encoders = {tuple(sorted(e[2])) for e in entries}
    if len(encoders) != 1:
        raise ValueError(f"{src}: some embeddings are for SDXL's two text encoders (clip_l + clip_g), others for one")
    for enc in next(iter(encoders)):
        dims = {int(e[2][enc].shape[1]) for e in entries}
        if len(dims) != 1:
            raise ValueError(f"{src}: the embeddings have different widths {sorted(dims)}")
    if "text_encoder" not in next(iter(encoders)):
        raise ValueError(f"{src}: an SDXL embedding needs its clip_l vectors")

    def squeeze(t: Any) -> Any:
        t = t.detach().to(torch.float32)
        return t[0] if t.shape[0] == 1 else t

    embeddings = {e[1]: squeeze(e[2]["text_encoder"]) for e in entries}
    embeddings_2 = {e[1]: squeeze(e[2]["text_encoder_2"]) for e in entries if "text_encoder_2" in e[2]}
    if embeddings_2 and len(embeddings_2) != len(embeddings):
        raise ValueError(f"{src}: some embeddings lack clip_g vectors")
    family = _family(found, info, embeddings, embeddings_2)
    layout = info.get("unet_layout") if isinstance(info.get("unet_layout"), Mapping) else None
    roles = {e[1]: e[3] for e in entries}
    inits = {e[1]: e[4] for e in entries}

    lora, rank, alpha, targets = _assemble(found.layers, info)
    out.mkdir(parents=True, exist_ok=True)
    kind = families.get(family)
    if len(kind.text_encoders) > 1 and not embeddings_2:
        keys = " and ".join((kind.embedding_keys or {}).get(e, e) for e in kind.text_encoders)
        raise ValueError(f"{src}: an {kind.title} asset needs embeddings for both text encoders ({keys}); "
                         "these embeddings are for one (SD 1.x / 2.x)")
    if len(kind.text_encoders) < 2 and (lora.get("text_encoder_2")):
        raise ValueError(f"{src}: LoRA weights for a second text encoder, but embeddings for one")
    save_asset(out, tokens=toks, roles=roles, init_words=inits, embeddings=embeddings, lora=lora, lora_rank=rank,
               lora_alpha=alpha, targets=targets, family=family, embeddings_2=embeddings_2 or None,
               unet_layout=(layout or kind.default_layout) if kind.default_layout else None)
    card = {
        "format": 1,
        "kind": "caspec concept asset",
        "pseudo_words": [{"token": t, "init": inits[t], "role": roles[t]} for t in toks],
        "captions": [],
        "base_model": {"base": info.get("base_model") or "?", "family": family},
        "imported": {"from": str(src), "format": _format_name(found), "original_asset": info.get("asset"),
                     "files": [{"file": p.name, "sha256": _sha256(p)} for p in found.files]},
    }
    write_card(out, card)
    return out


def _family(found: _Found, info: Mapping[str, Any], embeddings: Mapping[str, Any],
            embeddings_2: Mapping[str, Any]) -> str:
    """The exporter's word, else what the files show: two text encoders (or SDXL layer names) -> sdxl;
    width 1024 -> sd2; else sd1."""
    if info.get("family") in families.FAMILIES:
        return str(info["family"])
    tinfo = [i for _, _, i in found.embeddings if i.get("family") in families.FAMILIES]
    if tinfo:
        return str(tinfo[0]["family"])
    if found.family:
        return found.family
    widths = {"text_encoder": {int(t.shape[-1]) for t in embeddings.values()}.pop()}
    if embeddings_2:
        widths["text_encoder_2"] = {int(t.shape[-1]) for t in embeddings_2.values()}.pop()
    return next((f.name for f in families.DETECTION_ORDER if f.claims_embedding(widths)), "sd1")


def _format_name(found: _Found) -> str:
    kinds = list(dict.fromkeys(found.formats))
    return kinds[0] if len(kinds) == 1 else "+".join(kinds)


def _assemble(layers: list[_Layer], info: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], int, float,
                                                                       dict[str, list[str]]]:
    """One rank and one alpha for all layers (other alphas folded into ``lora_B``), peft state dicts, targets."""
    import torch

    lora: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    if not layers:
        return lora, 0, 0.0, {c: [] for c in COMPONENTS}
    ranks = {int(x.a.shape[0]) for x in layers}
    if len(ranks) != 1:
        raise ValueError(f"the LoRA layers have different ranks {sorted(ranks)}: caspec assets use one rank")
    rank = ranks.pop()
    bad = [f"{x.comp}.{x.module}" for x in layers if x.b.shape[1] != rank]
    if bad:
        raise ValueError(f"LoRA layer {bad[0]}: lora_up/lora_B does not match rank {rank}")
    alphas = collections.Counter(x.alpha for x in layers)
    want = info.get("lora_alpha")
    alpha = float(want) if isinstance(want, (int, float)) and want in alphas else alphas.most_common(1)[0][0]
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0 (got {alpha})")
    for x in layers:
        module = _te_path(x.module) if x.comp == "text_encoder" else x.module
        b = x.b.detach().to(torch.float32)
        if x.alpha != alpha:
            b = b * (x.alpha / alpha)
        key = f"{module}.lora_A.weight"
        if key in lora[x.comp]:
            raise ValueError(f"LoRA layer {x.comp}.{module} found twice")
        lora[x.comp][key] = x.a.detach().to(torch.float32)
        lora[x.comp][f"{module}.lora_B.weight"] = b
    targets: dict[str, list[str]] = {}
    known = info.get("targets") if isinstance(info.get("targets"), Mapping) else {}
    for comp in COMPONENTS:
        modules = sorted({k.removesuffix(".lora_A.weight") for k in lora[comp] if k.endswith(".lora_A.weight")})
        listed = [str(t) for t in (known.get(comp) or [])]
        if listed and modules and _targets_fit(listed, modules):
            targets[comp] = listed
        else:
            targets[comp] = modules
    return lora, rank, alpha, targets


def _targets_fit(targets: list[str], modules: list[str]) -> bool:
    """Whether every module is matched by a target and every target matches a module (peft's suffix rule)."""
    def hit(m: str, t: str) -> bool:
        return m == t or m.endswith("." + t)

    return all(any(hit(m, t) for t in targets) for m in modules) and all(any(hit(m, t) for m in modules)
                                                                          for t in targets)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# caspec folders: a copy


def _copy_asset(src: Path, out: Path, renames: dict[str, str]) -> Path:
    asset = load_asset(src)  # validates the folder before anything is written
    unknown = sorted(set(renames) - set(asset.tokens))
    if unknown:
        raise ValueError(f"tokens= names {unknown} are not pseudo-words of {src} ({', '.join(asset.tokens)})")
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            atomic_write_bytes(out / path.relative_to(src), path.read_bytes())
    if renames:
        toks = [renames.get(t, t) for t in asset.tokens]
        if len(set(toks)) != len(toks):
            raise ValueError(f"tokens= renames give duplicate pseudo-words: {toks}")
        save_asset(out, tokens=toks, roles={renames.get(t, t): r for t, r in asset.roles.items()},
                   init_words={renames.get(t, t): w for t, w in asset.init_words.items()},
                   embeddings={renames.get(t, t): e for t, e in asset.embeddings.items()}, lora=asset.lora,
                   lora_rank=asset.lora_rank, lora_alpha=asset.lora_alpha, targets=asset.targets,
                   family=asset.family, embeddings_2={renames.get(t, t): e for t, e in asset.embeddings_2.items()},
                   unet_layout=asset.unet_layout or None)
        card = dict(asset.card)
        if isinstance(card.get("pseudo_words"), list):
            card["pseudo_words"] = [{**w, "token": renames.get(w.get("token"), w.get("token"))}
                                    if isinstance(w, Mapping) else w for w in card["pseudo_words"]]
        write_card(out, card)
    return out


__all__ = ["import_asset", "UnsafeFileError"]
