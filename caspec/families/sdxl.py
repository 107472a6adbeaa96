"""The SDXL family: two CLIP text encoders, pooled text and time ids, and kohya's SGM LoRA names.

:data:`SDXL` (a :class:`~caspec.families.base.Family`) is ``StableDiffusionXLPipeline``'s layout:
``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP ViT-bigG, with a projection), a UNet with the
``text_time`` added embedding. Prompts condition with both encoders' penultimate hidden states concatenated,
the pooled (projected) output of the second, and six time ids (original size, crop (0, 0), target size), as
diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does; an empty negative prompt is zeros where the model
says ``force_zeros_for_empty_prompt``. Embedding files key the encoders ``clip_l`` / ``clip_g``.

Kohya SDXL LoRA names: diffusers' SDXL UNet module paths <-> the SGM ("original") layout kohya's sd-scripts use.

kohya's sd-scripts train SDXL on Stability's SGM UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``),
so SDXL LoRA files (read by A1111, ComfyUI and diffusers) name UNet layers by their SGM path, dots as
underscores: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` is SGM
``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, which diffusers' ``UNet2DConditionModel`` calls
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. Text-encoder layers are
``lora_te1_text_model_<...>`` (CLIP ViT-L, pipeline component ``text_encoder``) and ``lora_te2_text_model_<...>``
(OpenCLIP bigG, ``text_encoder_2``). Each layer has ``<name>.lora_down.weight`` (peft ``lora_A``),
``<name>.lora_up.weight`` (peft ``lora_B``) and a scalar ``<name>.alpha`` (scale ``alpha / rank``).

The block arithmetic depends on the UNet config (``down_block_types``, ``up_block_types``,
``layers_per_block``, ``mid_block_type``), so every function takes it (``unet.config`` or the parsed
``unet/config.json``). The SGM layout, for down block ``b`` with ``L`` layers (``L = layers_per_block``):

* ``input_blocks.0.0`` is ``conv_in``; layer ``j`` of down block ``b`` is ``input_blocks.n`` with
  ``n = 1 + b * (L + 1) + j`` (``.0`` the resnet, ``.1`` the attention); the downsampler of every
  non-final down block is ``input_blocks.(1 + b * (L + 1) + L).0.op``;
* ``middle_block.0`` / ``.1`` / ``.2`` are ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``;
* layer ``j`` of up block ``i`` (``L + 1`` layers each) is ``output_blocks.(i * (L + 1) + j)`` (``.0``
  resnet, ``.1`` attention) and the upsampler of a non-final up block is ``.2.conv`` of its last layer
  (``.1.conv`` where the block has no attentions);
* inside attention blocks the names are the same (``proj_in``, ``transformer_blocks.k.attn1.to_q``,
  ``ff.net.0.proj``, ...); inside resnets ``conv1`` / ``time_emb_proj`` / ``conv2`` / ``conv_shortcut`` are
  ``in_layers.2`` / ``emb_layers.1`` / ``out_layers.3`` / ``skip_connection``; the top level has
  ``time_embed.0|2`` (``time_embedding.linear_1|2``), ``label_emb.0.0|2`` (``add_embedding.linear_1|2``) and
  ``out.2`` (``conv_out``).

Only modules whose kohya name diffusers' own converter (0.42: ``StableDiffusionXLLoraLoaderMixin.lora_state_dict``
with ``unet_config``) maps back to the same module are accepted; anything else raises ``ValueError``. The
default LoRA targets (attention ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) are always supported. Known limits
of that converter, outside SDXL's layout: it needs an integer ``layers_per_block``, and a file with SGM block
indices of 10 or more (e.g. four down blocks) trips its substring matching (``input_blocks_1`` also matches
``input_blocks_10``); SDXL's indices stop at 8.

The name mapping is pure; torch and diffusers are imported only where weights are loaded or converted.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from .base import TEXT_MODEL, UNetFamily, config_value, converted_module, pair_dict

KOHYA_SDXL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
"""Kohya name prefix per SDXL pipeline component."""


DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has attentions
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_CROSS_ATTN = "UNetMidBlock2DCrossAttn"

_SUPPORTED = ("kohya SDXL export supports LoRA on attention layers (the default targets to_q, to_k, to_v, "
              "to_out.0; also proj_in, proj_out, ff.net.0.proj, ff.net.2), resnet conv1 / conv2 / time_emb_proj / "
              "conv_shortcut, down/upsampler convs, conv_in, conv_out, time_embedding and add_embedding linears")

# leaves inside an attention block (Transformer2DModel in diffusers, SpatialTransformer in SGM: same names)
_ATTN_LEAF = re.compile(
    r"^(?:norm|proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$")
# resnet leaves: diffusers ResnetBlock2D -> SGM ResBlock
_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}
_DOWNSAMPLER = {"conv": "op"}
_UPSAMPLER = {"conv": "conv"}
_IDENTITY: dict[str, str] = {}  # marker: attention blocks keep their inner names
_LEAF = {"": ""}  # a top-level leaf module: no inner path


class _Entry(NamedTuple):
    """One container of the layout: its diffusers prefix, its SGM prefix and the map of names inside it."""

    diffusers: str
    sgm: str
    inner: Mapping[str, str]


def _get(cfg: Any, key: str, default: Any = KeyError) -> Any:
    return config_value(cfg, key, default, what="UNet config (pass unet.config or the UNet's config.json)")


def _layout_key(unet_config: Any) -> tuple:
    """The hashable part of a UNet config that decides the SGM layout."""
    down = tuple(_get(unet_config, "down_block_types"))
    up = tuple(_get(unet_config, "up_block_types"))
    lpb = _get(unet_config, "layers_per_block")
    lpb = tuple(int(x) for x in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * len(down)
    mid = _get(unet_config, "mid_block_type", MID_CROSS_ATTN)
    if len(up) != len(down) or len(lpb) != len(down):
        raise ValueError(f"UNet config: {len(down)} down blocks, {len(up)} up blocks and layers_per_block {lpb} "
                         "do not fit together")
    for kind, types, known in (("down", down, DOWN_TYPES), ("up", up, UP_TYPES)):
        for t in types:
            if t not in known:
                raise ValueError(f"UNet {kind} block type {t!r} has no SGM (kohya SDXL) layout here; "
                                 f"supported: {', '.join(known)}")
    return down, up, lpb, mid


@functools.lru_cache(maxsize=32)
def _layout(key: tuple) -> tuple[tuple[_Entry, ...], dict[str, _Entry], dict[str, _Entry]]:
    """All containers of the layout, indexed by diffusers prefix and by SGM prefix."""
    down, up, lpb, mid = key
    entries = [_Entry("conv_in", "input_blocks.0.0", _LEAF),
               _Entry("time_embedding.linear_1", "time_embed.0", _LEAF),
               _Entry("time_embedding.linear_2", "time_embed.2", _LEAF),
               _Entry("add_embedding.linear_1", "label_emb.0.0", _LEAF),
               _Entry("add_embedding.linear_2", "label_emb.0.2", _LEAF),
               _Entry("conv_out", "out.2", _LEAF)]
    n = 1
    for b, btype in enumerate(down):
        for j in range(lpb[b]):
            entries.append(_Entry(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{n}.0", _RESNET))
            if DOWN_TYPES[btype]:
                entries.append(_Entry(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{n}.1", _IDENTITY))
            n += 1
        if b < len(down) - 1:  # UNet2DConditionModel: every down block but the last downsamples
            entries.append(_Entry(f"down_blocks.{b}.downsamplers.0", f"input_blocks.{n}.0", _DOWNSAMPLER))
            n += 1
    if mid == MID_CROSS_ATTN:
        entries += [_Entry("mid_block.resnets.0", "middle_block.0", _RESNET),
                    _Entry("mid_block.attentions.0", "middle_block.1", _IDENTITY),
                    _Entry("mid_block.resnets.1", "middle_block.2", _RESNET)]
    n = 0
    for i, btype in enumerate(up):
        attn = UP_TYPES[btype]
        layers = lpb[len(up) - 1 - i] + 1  # up blocks mirror the down blocks, one layer more
        for j in range(layers):
            entries.append(_Entry(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _RESNET))
            if attn:
                entries.append(_Entry(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", _IDENTITY))
            n += 1
        # diffusers' converter maps output_blocks.N.2 to upsamplers but .1 always to attentions, so an upsampler
        # of an up block without attentions (SGM output_blocks.N.1.conv) cannot round-trip: left out (not SDXL's)
        if i < len(up) - 1 and attn:
            entries.append(_Entry(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{n - 1}.2", _UPSAMPLER))
    entries_t = tuple(entries)
    return entries_t, {e.diffusers: e for e in entries_t}, {e.sgm: e for e in entries_t}


def _split(module: str, index: Mapping[str, _Entry]) -> tuple[_Entry, str] | None:
    """The entry whose prefix starts ``module`` (longest first) and the rest of the path after it."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        entry = index.get(".".join(parts[:cut]))
        if entry is not None:
            return entry, ".".join(parts[cut:])
    return None


def _unsupported(module: str, layout: str, why: str = "") -> ValueError:
    """The ValueError for a module with no kohya SDXL name."""
    return ValueError(f"UNet module {module!r} ({layout} layout) has no kohya SDXL name{why}: {_SUPPORTED}")


def _map(module: str, unet_config: Mapping, *, to_sgm: bool) -> str:
    """Map one module path in either direction (shared by :func:`diffusers_to_sgm` / :func:`sgm_to_diffusers`)."""
    if not isinstance(module, str) or not module:
        raise ValueError(f"module path must be a non-empty string, not {module!r}")
    entries, by_diffusers, by_sgm = _layout(_layout_key(unet_config))
    src, dst = (0, 1) if to_sgm else (1, 0)
    layout = "diffusers" if to_sgm else "SGM"
    found = _split(module, by_diffusers if to_sgm else by_sgm)
    if found is None:
        raise _unsupported(module, layout, " (no such block in this UNet config)")
    entry, rest = found
    inner = entry.inner
    if inner is _IDENTITY:
        if not _ATTN_LEAF.match(rest):
            raise _unsupported(module, layout, f" (attention-block part {rest!r} is not a LoRA-able leaf)")
        mapped = rest
    else:
        table = inner if to_sgm else {v: k for k, v in inner.items()}
        if rest not in table:
            what = "leaf module" if inner is _LEAF else f"part {rest!r}"
            raise _unsupported(module, layout, f" ({what} of {entry[src]} is not supported)")
        mapped = table[rest]
    return f"{entry[dst]}.{mapped}" if mapped else entry[dst]


def diffusers_to_sgm(module: str, unet_config: Mapping) -> str:
    """The SGM (kohya SDXL) path of a diffusers UNet module path.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` on SDXL's layout; ``unet_config`` is ``unet.config``
    (or the parsed ``config.json``). Raises ``ValueError`` for modules without a kohya SDXL name that diffusers
    maps back (norms in resnets, blocks the config does not have, ...), naming the module.
    """
    return _map(module, unet_config, to_sgm=True)


def sgm_to_diffusers(module: str, unet_config: Mapping) -> str:
    """The diffusers UNet module path of a dotted SGM path: the inverse of :func:`diffusers_to_sgm`.

    ``output_blocks.0.1.proj_in`` -> ``up_blocks.0.attentions.0.proj_in``. Raises ``ValueError`` for paths
    :func:`diffusers_to_sgm` never returns.
    """
    return _map(module, unet_config, to_sgm=False)


_TE_LEAF = re.compile(r"^encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$")


def kohya_sdxl_name(component: str, module: str, unet_config: Mapping | None = None) -> str:
    """The kohya SDXL LoRA layer name of ``module`` of pipeline ``component`` (without ``.lora_down.weight`` etc).

    * ``unet``: ``lora_unet_`` + :func:`diffusers_to_sgm` with dots as underscores (needs ``unet_config``);
    * ``text_encoder`` / ``text_encoder_2``: ``lora_te1_`` / ``lora_te2_`` + ``text_model_`` + the path
      (``encoder.layers.0.self_attn.q_proj``; a leading ``text_model.`` is accepted, recent transformers
      flatten it away from ``CLIPTextModel``). Only the attention projections and MLP ``fc1`` / ``fc2`` are
      supported (the LoRA-able linears of a CLIP text encoder layer).
    """
    if component not in KOHYA_SDXL_PREFIX:
        raise ValueError(f"component {component!r}: expected one of {', '.join(KOHYA_SDXL_PREFIX)}")
    if component == "unet":
        if unet_config is None:
            raise ValueError("kohya_sdxl_name('unet', ...) needs the UNet config")
        path = diffusers_to_sgm(module, unet_config)
    else:
        inner = module.removeprefix(TEXT_MODEL)
        if not _TE_LEAF.match(inner):
            raise ValueError(f"{component} module {module!r} has no kohya SDXL name: supported are "
                             "encoder.layers.N.self_attn.{q,k,v,out}_proj and encoder.layers.N.mlp.fc1/fc2 "
                             "(with or without text_model.)")
        path = TEXT_MODEL + inner
    return KOHYA_SDXL_PREFIX[component] + path.replace(".", "_")


LAYOUT_KEYS = ("down_block_types", "up_block_types", "layers_per_block", "mid_block_type")
SDXL_BASE_LAYOUT: dict[str, Any] = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
"""The block layout of SDXL base 1.0's UNet: assumed for kohya names when an asset does not record its own."""


def unet_layout(unet_config: Any) -> dict[str, Any]:
    """The part of a UNet config the SGM names depend on (what an SDXL asset records as ``unet_layout``)."""
    out = {}
    for key in LAYOUT_KEYS:
        value = _get(unet_config, key, SDXL_BASE_LAYOUT[key])
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out



# ---------------------------------------------------------------------------------------------
# the family


class SDXLFamily(UNetFamily):
    name = "sdxl"
    title = "SDXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    weights = (("text_encoder", "transformers"), ("text_encoder_2", "transformers"), ("unet", "diffusers"),
               ("vae", "diffusers"))
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    kohya_prefix = KOHYA_SDXL_PREFIX
    kohya_base_version = "sdxl_base_v1-0"
    default_layout = SDXL_BASE_LAYOUT

    def claims(self, folder: Path, index: Mapping[str, Any]) -> bool:
        return (folder / "text_encoder_2").is_dir() or "text_encoder_2" in index or "XL" in str(
            index.get("_class_name", ""))

    def load_text_encoders(self, folder: Path, dtype: Any, part: Callable[[str], None]) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        out = super().load_text_encoders(folder, dtype, part)
        part("tokenizer_2")
        out["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        part("text_encoder_2")
        out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            folder / "text_encoder_2", local_files_only=True, dtype=dtype, variant=self._variant(folder / "text_encoder_2"))
        return out

    def empty_negative_is_zeros(self, index: Mapping[str, Any]) -> bool:
        return bool(index.get("force_zeros_for_empty_prompt", True))

    def encode(self, pipe: Any, ids: Sequence[tuple[Any, Any]]) -> Any:
        """Both encoders' penultimate hidden states, concatenated, and the second's pooled projection."""
        import torch

        from ..models.text import TextCond

        hidden, pooled = [], None
        for (_, _, te), (input_ids, _mask) in zip(pipe.text_encoders, ids):
            out = te(input_ids.to(pipe.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled embedding
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("the SDXL model's second text encoder gives no pooled (projected) embedding")
        dtype = pipe.text_encoder_2.dtype
        return TextCond(torch.cat(hidden, dim=-1).to(dtype=dtype), pooled.to(dtype=dtype))

    def added_cond(self, pipe: Any, cond: Any, resolution: int) -> dict[str, Any]:
        """``added_cond_kwargs``: the pooled text and the six time ids (square image, no crop)."""
        if cond.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding")
        return {"text_embeds": cond.pooled.to(pipe.device),
                "time_ids": time_ids(resolution, len(cond), dtype=cond.embeds.dtype, device=pipe.device)}

    def asset_layout(self, pipe: Any) -> dict[str, Any]:
        return unet_layout(pipe.unet.config)

    def kohya_name(self, component: str, module: str, layout: Mapping[str, Any] | None = None) -> str:
        return kohya_sdxl_name(component, module, layout or SDXL_BASE_LAYOUT)

    def lora_saver(self) -> Any:
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        return StableDiffusionXLLoraLoaderMixin

    def kohya_modules(self, names: Mapping[str, Mapping[str, Any]], layout: Mapping[str, Any] | None) -> dict[str, str]:
        """Through diffusers' own SDXL converter; the UNet's SGM names need its block layout (the exporter's
        ``unet_layout``, else SDXL base 1.0's)."""
        from types import SimpleNamespace

        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        config = SimpleNamespace(**(layout or SDXL_BASE_LAYOUT))
        return {name: converted_module(StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            pair_dict(name, parts), unet_config=config)[0], name) for name, parts in names.items()}

    def claims_lora_names(self, names: Sequence[str]) -> bool:
        return any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "input_blocks_" in n or "output_blocks_" in n
                   or "middle_block_" in n for n in names)

    def claims_embedding(self, widths: Mapping[str, int]) -> bool:
        return "text_encoder_2" in widths


def time_ids(resolution: int, n: int, *, dtype: Any, device: Any) -> Any:
    """SDXL's added time ids ``[n, 6]``: original size, crop top-left (0, 0), target size."""
    import torch

    row = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype, device=device)
    return row.repeat(n, 1)


SDXL = SDXLFamily()

__all__ = ["SDXL", "SDXLFamily", "KOHYA_SDXL_PREFIX", "SDXL_BASE_LAYOUT", "unet_layout", "diffusers_to_sgm",
           "sgm_to_diffusers", "kohya_sdxl_name", "time_ids"]
