"""Export a concept asset for other tools: diffusers, A1111 / ComfyUI (kohya LoRA + embeddings), or one bundle file.

``export_asset(asset, fmt, out)`` writes into the folder ``out`` (created if needed; for ``bundle`` ``out`` may
also name the ``.safetensors`` file itself) and returns the files it wrote. Every file is a safetensors file
written atomically with a canonical header (:func:`caspec.assets.format.safetensors_bytes`); each carries a
``caspec`` JSON entry in its header metadata (tokens, roles, initializer words, rank, alpha, targets) that
:func:`caspec.assets.importer.import_asset` reads to rebuild the asset exactly. Below, ``<word>`` is a
pseudo-word without its angle brackets (``<shape1>`` -> ``shape1``) and ``<name>`` the asset's name.

``diffusers``
    * ``pytorch_lora_weights.safetensors``: the LoRA of both components, keys as diffusers'
      ``StableDiffusionLoraLoaderMixin.save_lora_weights`` packs them (``unet.<module>.lora.down.weight``,
      ``text_encoder.text_model.<module>.lora_linear_layer.up.weight``, ...: the peft state dicts through
      ``convert_state_dict_to_diffusers``). Rank and alpha travel in the header entry
      ``lora_adapter_metadata`` (``{"unet.r": 4, "unet.lora_alpha": 8.0, "unet.target_modules": [...], ...}``),
      which diffusers' loader (0.42 here) turns into the ``LoraConfig``: a ``lora_alpha`` different from the
      rank loads with the trained scale ``alpha / rank``. (A loader that ignores that header would use
      ``alpha = rank``.)
    * ``<word>.safetensors`` per pseudo-word: ``{"<word-with-brackets>": tensor[1, d]}``, the layout
      ``load_textual_inversion`` reads (it takes one token per file: a dict with several keys is refused).

    Loading::

        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(base_model)
        pipe.load_lora_weights("out", adapter_name="my_asset")        # finds pytorch_lora_weights.safetensors
        pipe.load_textual_inversion(["out/shape1.safetensors", "out/col1.safetensors"])  # tokens from the files
        pipe.set_adapters(["my_asset"], adapter_weights=[1.0])       # optional: LoRA strength
        image = pipe("a photo of <shape1> <col1>").images[0]

``a1111``
    * ``<word>.safetensors`` per pseudo-word: ``{"emb_params": tensor[1, d]}`` (A1111 / kohya embedding; the
      file name is the trigger word). Copy to A1111's ``embeddings/`` (ComfyUI: ``models/embeddings``).
    * ``<name>.safetensors``: kohya-style LoRA for SD1.x, keys ``lora_unet_<module_path_with_underscores>`` /
      ``lora_te_text_model_<...>`` + ``.lora_down.weight`` (= peft ``lora_A``), ``.lora_up.weight``
      (``lora_B``) and ``.alpha`` = the asset's ``lora_alpha`` (kohya scales by ``alpha / rank``, rank = rows of
      ``lora_down``: the trained scale, also when ``lora_alpha != rank``; diffusers'
      ``convert_state_dict_to_kohya`` would write ``alpha = rank``). Header: kohya's ``ss_network_module``,
      ``ss_network_dim``, ``ss_network_alpha``. Copy to ``models/Lora/``; prompt
      ``a photo of shape1 col1 <lora:<name>:1>`` (ComfyUI: LoraLoader, ``embedding:shape1``). diffusers reads it
      too: ``pipe.load_lora_weights("out/<name>.safetensors")``.

``bundle``
    ``<name>.safetensors``: the kohya LoRA above plus each embedding as
    ``bundle_emb.<word>.string_to_param.*`` (tensor ``[1, d]``), the bundled-embedding convention A1111 and
    ComfyUI read from LoRA files (diffusers' loaders do not read bundles).

SDXL assets (two text encoders):

* embeddings are ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` per word, in ``diffusers`` and ``a1111`` alike:
  the layout diffusers' SDXL pivotal-tuning script writes and A1111 and ComfyUI load; diffusers loads it with
  ``pipe.load_textual_inversion(state["clip_l"], token=[...], text_encoder=pipe.text_encoder,
  tokenizer=pipe.tokenizer)`` and the same with ``clip_g`` / ``text_encoder_2`` / ``tokenizer_2``;
* ``pytorch_lora_weights.safetensors`` is packed by ``StableDiffusionXLLoraLoaderMixin.save_lora_weights``
  (``unet.``, ``text_encoder.``, ``text_encoder_2.`` keys), read by ``StableDiffusionXLPipeline.load_lora_weights``;
* kohya names follow kohya's SDXL naming (:mod:`caspec.families.sdxl`): ``lora_unet_input_blocks_4_1_...``
  (the SGM UNet layout), ``lora_te1_text_model_...``, ``lora_te2_text_model_...``; ``ss_base_model_version``
  ``sdxl_base_v1-0``;
* bundles hold ``bundle_emb.<word>.clip_l`` and ``bundle_emb.<word>.clip_g``.

A word of ``n > 1`` vectors is exported as ``[n, d]`` everywhere (A1111's ``num_vectors_per_token``; diffusers
loads it as ``<w>``, ``<w>_1``, ... and expands the word in prompts itself).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from ..fsutil import atomic_write_bytes
from .. import families
from ..families.base import TEXT_MODEL, with_text_model
from .format import COMPONENTS, HEADER_COMPONENTS, Asset, adapter_name_for, safetensors_bytes

FORMATS = ("diffusers", "a1111", "bundle")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
META_KEY = "caspec"  # header entry of every exported file (JSON)
EXPORT_FORMAT = "caspec-concept-asset-export"
EXPORT_VERSION = 2  # 2: family, per-encoder (SDXL) and multi-vector embeddings
BUNDLE_PREFIX = "bundle_emb."

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


# ---------------------------------------------------------------------------------------------
# shared helpers (also used by the importer)


def word_for(token: str) -> str:
    """The bare word for a pseudo-word (``<shape1>`` -> ``shape1``): file names and A1111 trigger words."""
    inner = token.strip().removeprefix("<").removesuffix(">")
    word = re.sub(r"[^A-Za-z0-9_.-]+", "_", inner).strip("._")
    if not word:
        raise ValueError(f"pseudo-word {token!r} gives no usable file name")
    return word


def lora_layers(state: Mapping[str, Any], what: str = "LoRA") -> dict[str, tuple[Any, Any]]:
    """A peft state dict (``<module>.lora_A.weight`` / ``.lora_B.weight``) as ``{module: (A, B)}``."""
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{what}: cannot export key {key!r} (only plain LoRA lora_A / lora_B weights are "
                             "supported: no DoRA magnitudes or LoRA biases)")
        pairs.setdefault(m["module"], {})[m["part"]] = value
    out = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{what}: module {module!r} has {sorted(parts)} but needs both lora_A and lora_B")
        out[module] = (parts["lora_A"], parts["lora_B"])
    return out


def kohya_name(comp: str, module: str, asset: Asset | None = None) -> str:
    """The kohya LoRA layer name of ``comp``'s ``module``, as the asset's family names it (SD 1.x without one)."""
    family = families.get(asset.family if asset is not None else "sd1")
    return family.kohya_name(comp, module, asset.unet_layout if asset is not None else None)


def _f32(t: Any) -> Any:
    import torch

    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _asset_info(asset: Asset, fmt: str, words: Mapping[str, str]) -> dict[str, Any]:
    base = (asset.card or {}).get("base_model") or {}
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "export": fmt, "asset": asset.name,
        "family": asset.family, "unet_layout": asset.unet_layout or None,
        "tokens": list(asset.tokens), "words": {t: words[t] for t in asset.tokens},
        "roles": {t: asset.roles.get(t, "") for t in asset.tokens},
        "init_words": {t: asset.init_words.get(t, "") for t in asset.tokens},
        "lora_rank": int(asset.lora_rank), "lora_alpha": float(asset.lora_alpha),
        "targets": {c: list(asset.targets.get(c) or []) for c in COMPONENTS
                    if c in HEADER_COMPONENTS or asset.targets.get(c)},
        "base_model": base.get("base") if isinstance(base, Mapping) else None,
    }


def _token_info(asset: Asset, token: str) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "asset": asset.name, "token": token,
            "family": asset.family,
            "index": asset.tokens.index(token), "role": asset.roles.get(token, ""),
            "init_word": asset.init_words.get(token, "")}


def _meta(info: Mapping[str, Any], **extra: str) -> dict[str, str]:
    return {META_KEY: json.dumps(info, sort_keys=True, separators=(",", ":")), **extra}


def _checked_layers(asset: Asset) -> dict[str, dict[str, tuple[Any, Any]]]:
    """component -> {module: (A, B)}, checking every layer has the asset's rank."""
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for comp in COMPONENTS:
        layers = lora_layers(asset.lora.get(comp) or {}, f"asset {asset.name} ({comp})")
        for module, (a, b) in layers.items():
            if a.shape[0] != asset.lora_rank or b.shape[1] != asset.lora_rank:
                raise ValueError(f"asset {asset.name}: LoRA layer {comp}.{module} has rank {a.shape[0]}, but the "
                                 f"asset says lora_rank {asset.lora_rank}")
        out[comp] = layers
    if any(out.values()) and not asset.lora_alpha > 0:
        raise ValueError(f"asset {asset.name}: lora_alpha must be > 0 (got {asset.lora_alpha})")
    return out


def _words(asset: Asset, taken: set[str] = frozenset()) -> dict[str, str]:
    words: dict[str, str] = {}
    for tok in asset.tokens:
        w = word_for(tok)
        clash = [t for t, other in words.items() if other.lower() == w.lower()]
        if clash:
            raise ValueError(f"pseudo-words {clash[0]} and {tok} give the same file name {w!r}")
        if w.lower() in {x.lower() for x in taken}:
            raise ValueError(f"pseudo-word {tok} gives the file name {w!r}, which the export needs for another file")
        words[tok] = w
    return words


def _emb(asset: Asset, token: str, encoder: str = "text_encoder") -> Any:
    """``token``'s vectors for ``encoder`` as ``[n, d]`` float32."""
    return _f32(asset.rows(token, encoder))


def embedding_tensors(asset: Asset, token: str, single_key: str, *, aliases: bool = False) -> dict[str, Any]:
    """One word's embedding file: ``{single_key: [n, d]}``, or one key per text encoder where the family names
    them (SDXL's ``{"clip_l": ..., "clip_g": ...}``, FLUX.1's ``{"clip_l": ..., "t5": ...}``); ``aliases`` adds the
    other names tools read (ComfyUI's ``t5xxl``)."""
    family = families.get(asset.family)
    if not family.embedding_keys:
        return {single_key: _emb(asset, token)}
    out = {family.embedding_keys[enc]: _emb(asset, token, enc) for enc in asset.encoders}
    if aliases:
        out.update({key: _emb(asset, token, enc) for key, enc in family.embedding_file_keys.items() if key not in out})
    return out


# ---------------------------------------------------------------------------------------------
# the formats


def export_asset(asset: Asset, fmt: str, out: str | Path) -> list[Path]:
    """Write ``asset`` in format ``fmt`` (one of :data:`FORMATS`) under ``out``; returns the files written.
    An asset whose card keeps a LoRA time window also gets a model card saying so (:func:`window_card`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not asset.tokens:
        raise ValueError(f"asset {asset.name} has no pseudo-words to export")
    out = Path(out)
    if fmt == "diffusers":
        written = _export_diffusers(asset, out)
    elif fmt == "a1111":
        written = _export_a1111(asset, out)
    else:
        written = _export_bundle(asset, out)
    card = window_card(asset, fmt)
    if card is not None:
        name = "README.md" if fmt == "diffusers" else f"{adapter_name_for(asset.name)}.md"
        written.append(atomic_write_bytes(written[-1].parent / name, card.encode("utf-8")))
    return written


def window_card(asset: Asset, fmt: str) -> str | None:
    """A model card stating the asset's LoRA time window and what a tool without windows loses (None: no window)."""
    kept = (asset.card or {}).get("lora_window")
    if not isinstance(kept, dict) or not kept.get("window"):
        return None
    start, end = kept["window"]
    how = "measured after training (`lora_window: auto`)" if kept.get("how") == "auto" else "set when it was trained"
    lines = [f"# {asset.name}", "",
             f"Pseudo-words: {', '.join(f'`{t}`' for t in asset.tokens)}.", "",
             "## LoRA time window", "",
             f"This asset's denoiser LoRA should act only while the sampler's noise level t/T is in "
             f"[{start:g}, {end:g}] (1 = pure noise, 0 = the finished image); {how}. "
             f"{kept.get('effect', '')}".strip(), "",
             "caspec applies it in compose (`lora_windows: {asset: auto}`). This file format cannot carry it: a tool "
             "that applies the LoRA at every step gets the asset's appearance *and* its pull on the layout (for a "
             "colour asset trained on centred images: objects drawn in the centre).", "",
             "Where a tool can schedule a LoRA by step, keep it off for the first part of sampling, about the first "
             f"{1 - end:.0%} of the steps (the exact share depends on the sampler's schedule): in ComfyUI with "
             "LoRA hook keyframes (a keyframe at that start percent), in A1111 with an extension that gives a "
             "LoRA start and stop steps. The text-encoder LoRA and the embeddings act throughout."]
    if kept.get("profile"):
        lines += ["", "| t/T | layout change | appearance change |", "|---|---|---|"]
        lines += [f"| {r['t']:g} | {r['layout']:.4f} | {r['appearance']:.4f} |" for r in kept["profile"]]
    return "\n".join(lines) + "\n"


def _out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _export_diffusers(asset: Asset, out: Path) -> list[Path]:
    out = _out_dir(out)
    words = _words(asset, {Path(DIFFUSERS_LORA_FILE).stem})
    layers = _checked_layers(asset)
    written: list[Path] = []
    for tok in asset.tokens:
        data = safetensors_bytes(embedding_tensors(asset, tok, tok), _meta(_token_info(asset, tok), format="pt"))
        written.append(atomic_write_bytes(out / f"{words[tok]}.safetensors", data))
    if any(layers.values()):
        tensors, meta = diffusers_lora(asset, layers, out)
        meta = {**meta, **_meta(_asset_info(asset, "diffusers", words))}
        written.append(atomic_write_bytes(out / DIFFUSERS_LORA_FILE, safetensors_bytes(tensors, meta)))
    return written


def diffusers_lora(asset: Asset, layers: Mapping[str, Mapping[str, tuple[Any, Any]]],
                   out: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and header of ``pytorch_lora_weights.safetensors``, packed by diffusers' own saver.

    ``save_lora_weights`` is given a ``save_function`` that only captures the packed state dict: the file
    itself is written by caspec (atomically, canonical header) with the ``lora_adapter_metadata`` entry
    that diffusers' default saver would have added.
    """
    family = families.get(asset.family)
    saver = family.lora_saver()

    kwargs: dict[str, Any] = {}
    adapter_meta: dict[str, Any] = {}
    for comp in COMPONENTS:
        if not layers.get(comp):
            continue
        if comp not in family.diffusers_lora_components:
            raise ValueError(f"asset {asset.name} has LoRA on {comp}, which diffusers' {family.title} loader cannot "
                             "load: export it as `a1111` (kohya names) instead")
        peft_sd = {}
        for module, (a, b) in layers[comp].items():
            path = with_text_model(module) if comp != family.denoiser else module
            peft_sd[f"{path}.lora_A.weight"] = _f32(a)
            peft_sd[f"{path}.lora_B.weight"] = _f32(b)
        kwargs[f"{comp}_lora_layers"] = dict(peft_sd) if family.peft_names_in_diffusers_files else _diffusers_names(peft_sd)
        targets = list(asset.targets.get(comp) or [])
        if not targets:  # exact module paths; without `text_model.`, peft's suffix match then fits either layout
            targets = sorted(m.removeprefix(TEXT_MODEL) for m in layers[comp])
        meta = {"r": int(asset.lora_rank), "lora_alpha": float(asset.lora_alpha), "target_modules": targets}
        kwargs[f"{comp}_lora_adapter_metadata"] = meta
        adapter_meta.update({f"{comp}.{k}": v for k, v in meta.items()})
    captured: dict[str, Any] = {}

    def capture(weights: dict[str, Any], filename: str) -> None:
        captured.update(weights)

    saver.save_lora_weights(str(out), safe_serialization=True, save_function=capture, **kwargs)
    if not captured:
        raise RuntimeError("diffusers' save_lora_weights produced no tensors")
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True)}
    return {k: _f32(v) for k, v in captured.items()}, header


def _diffusers_names(peft_sd: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names for a peft state dict, as its training scripts save them; but where diffusers'
    converter knows only some of the layers (it maps attention projections, not e.g. the ResNet convolutions
    of `unet_targets: [..., conv1, conv2]`), every key keeps peft's name: a file that mixes the two styles
    loads only the peft-named layers in diffusers, while peft names alone load whole."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(peft_sd)
    if any(".lora_A." in k or ".lora_B." in k for k in converted):
        return dict(peft_sd)
    return converted


def kohya_lora(asset: Asset, layers: Mapping[str, Mapping[str, tuple[Any, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Kohya LoRA tensors (``lora_down`` / ``lora_up`` / ``alpha``) and kohya header entries, named as the asset's
    family names them (:meth:`caspec.families.base.Family.kohya_lora`; FLUX.1 fuses q/k/v, keeping each delta).

    ``alpha`` is the asset's ``lora_alpha`` (times the parts of a fused layer), so ``alpha / rank`` is the scale
    training used. Also returns ``modules``: kohya name -> ``component:module path[,...]`` (underscores make kohya
    names ambiguous; the importer uses this map and falls back to diffusers' converters without it).
    """
    family = families.get(asset.family)
    present = {comp: layer for comp, layer in layers.items() if layer}
    tensors, modules = family.kohya_lora(present, int(asset.lora_rank), float(asset.lora_alpha), asset.unet_layout)
    header = family.kohya_header(int(asset.lora_rank), float(asset.lora_alpha))
    return tensors, {**header, "modules": json.dumps(modules, sort_keys=True, separators=(",", ":"))}


def _kohya_file(asset: Asset, fmt: str, words: Mapping[str, str], *, bundle: bool) -> bytes:
    layers = _checked_layers(asset)
    tensors, header = kohya_lora(asset, layers)
    modules = json.loads(header.pop("modules"))
    info = {**_asset_info(asset, fmt, words), "modules": modules}
    if bundle:
        for tok in asset.tokens:
            for key, t in embedding_tensors(asset, tok, "string_to_param.*").items():
                tensors[f"{BUNDLE_PREFIX}{words[tok]}.{key}"] = t
    if not tensors:
        raise ValueError(f"asset {asset.name} has no LoRA weights to write")
    return safetensors_bytes(tensors, {**header, **_meta(info)})


def _export_a1111(asset: Asset, out: Path) -> list[Path]:
    out = _out_dir(out)
    name = adapter_name_for(asset.name)
    words = _words(asset, {name} if asset.has_lora else set())
    written = []
    for tok in asset.tokens:
        data = safetensors_bytes(embedding_tensors(asset, tok, "emb_params", aliases=True),
                                 _meta(_token_info(asset, tok)))
        written.append(atomic_write_bytes(out / f"{words[tok]}.safetensors", data))
    if asset.has_lora:
        written.append(atomic_write_bytes(out / f"{name}.safetensors", _kohya_file(asset, "a1111", words, bundle=False)))
    return written


def _export_bundle(asset: Asset, out: Path) -> list[Path]:
    if out.suffix == ".safetensors" and not out.is_dir():
        target = out
    else:
        target = _out_dir(out) / f"{adapter_name_for(asset.name)}.safetensors"
    words = _words(asset)
    return [atomic_write_bytes(target, _kohya_file(asset, "bundle", words, bundle=True))]


__all__ = ["FORMATS", "DIFFUSERS_LORA_FILE", "META_KEY", "export_asset", "window_card", "word_for", "lora_layers", "kohya_name",
           "kohya_lora", "diffusers_lora", "with_text_model", "embedding_tensors"]
