"""FLUX.1 LoRA files in the names other tools read: export to kohya / ComfyUI / Forge, import from every style in use.

caspec keeps a FLUX.1 LoRA as peft weights on diffusers' modules: ``transformer`` (``FluxTransformer2DModel``),
``text_encoder`` (CLIP-L) and ``text_encoder_2`` (T5). Other tools name layers by Black Forest Labs' (BFL)
original model, which joins modules that diffusers keeps apart:

BFL path (kohya: ``lora_unet_`` + path with ``_``)  ->  diffusers ``FluxTransformer2DModel`` module(s)

* ``double_blocks.i.img_attn.qkv`` -> ``transformer_blocks.i.attn.to_q``, ``to_k``, ``to_v`` (fused, 3 parts);
  ``txt_attn.qkv`` -> ``attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``
* ``double_blocks.i.img_attn.proj`` / ``txt_attn.proj`` -> ``attn.to_out.0`` / ``attn.to_add_out``
* ``double_blocks.i.img_mlp.0`` / ``.2`` -> ``ff.net.0.proj`` / ``ff.net.2`` (``txt_mlp``: ``ff_context.net``)
* ``double_blocks.i.img_mod.lin`` / ``txt_mod.lin`` -> ``norm1.linear`` / ``norm1_context.linear``
* ``single_blocks.i.linear1`` -> ``single_transformer_blocks.i.attn.to_q``, ``to_k``, ``to_v``, ``proj_mlp`` (fused,
  4 parts); ``linear2`` -> ``proj_out``; ``modulation.lin`` -> ``norm.linear``
* ``img_in`` / ``txt_in`` -> ``x_embedder`` / ``context_embedder``; ``time_in`` / ``vector_in`` / ``guidance_in``
  ``.in_layer|.out_layer`` -> ``time_text_embed.timestep_embedder`` / ``text_embedder`` / ``guidance_embedder``
  ``.linear_1|.linear_2``
* ``final_layer.linear`` -> ``proj_out``; ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with the two
  output halves swapped (BFL: shift, scale; diffusers: scale, shift)

Text encoders: ``lora_te1_text_model_<CLIP path>`` (CLIP-L) and ``lora_te3_<T5 path>`` (T5-XXL,
``encoder_block_0_layer_0_SelfAttention_q``); each layer is ``<name>.lora_down.weight`` (peft ``lora_A``),
``<name>.lora_up.weight`` (``lora_B``) and a scalar ``<name>.alpha``; every reader scales by
``alpha / lora_down.shape[0]``.

Who reads what (sources read for this module):

* kohya sd-scripts (``networks/lora_flux.py``) builds its LoRA over the BFL model, so its names are the fused BFL
  paths (``LORA_PREFIX_FLUX = "lora_unet"``, T5 ``"lora_te3"``); ``create_network_from_weights`` takes each
  module's rank from ``lora_down``. Its ``split_qkv`` option is training-only: ``state_dict`` re-fuses and
  ``load_state_dict`` splits, files are always fused. ``networks/convert_flux_lora.py`` (diffusers/ai-toolkit ->
  sd-scripts) concatenates the parts' ``lora_down`` and writes a block-diagonal ``lora_up`` with alpha = the new
  rank; it needs every part of a fused module (it fails on single blocks trained without ``proj_mlp``).
* ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet``) maps ``lora_unet_<BFL path with _>`` and
  ``diffusion_model.<BFL path>`` onto its BFL model's own weights, so only fused names resolve there; it also reads
  diffusers names (``transformer.<path>``, OneTrainer ``lora_transformer_<path>``) through ``flux_to_diffusers``,
  writing split q/k/v into slices of the fused weight. T5: ``lora_te3_`` (and ``lora_te2_``, OneTrainer's Flux name).
* Forge (``backend/patcher/lora.py`` with its bundled ComfyUI key map): ``lora_unet_<BFL path>``,
  ``transformer.<diffusers path>``; T5 as ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_``.
* diffusers (``_convert_kohya_flux_lora_to_diffusers``, used by ``FluxLoraLoaderMixin.lora_state_dict``) reads the
  fused names, splitting a block-sparse ``lora_up`` back into per-part LoRAs.

No tool reads a split kohya name (``lora_unet_double_blocks_0_img_attn_q``): the BFL model has no such module, so
:func:`kohya_flux_lora` always writes the fused layout. A fused layer's ``lora_down`` is the present parts' ``A``
stacked (rank ``k * r`` for ``k`` parts), its ``lora_up`` is block-diagonal (rows of parts without a LoRA, e.g.
``proj_mlp`` under the default targets, stay zero) and its alpha is ``k * alpha``, so each part's delta stays
``B @ A * alpha / r``. For ``final_layer.*`` the scale ``alpha / r`` is multiplied into ``lora_up`` and alpha is
written as ``r``, because diffusers' converter ignores the alpha of those two layers (kohya, ComfyUI and Forge do
not); every reader then gets the same delta.

Import (:func:`flux_lora_layers`) reads kohya, ComfyUI-native, diffusers / peft / ai-toolkit and OneTrainer names
itself and only hands files in none of those styles (XLabs, BFL control, fal Kontext) to diffusers'
``FluxLoraLoaderMixin.lora_state_dict``. Reasons, from diffusers 0.42.1's converter: it knows blocks 0-18 / 0-37
only and the single-block split ``[3072, 3072, 3072, 12288]`` (any other size fails an assert), silently drops
T5 keys (``lora_te3_``), ignores the alpha of ``final_layer.*``, maps OneTrainer keys outside attention to the
block itself (``lora_transformer_transformer_blocks_0_ff_net_0_proj`` -> ``transformer_blocks.0``), returns the
non-block layers (``x_embedder``, ``proj_out``, ...) without the ``transformer.`` prefix, so ``load_lora_weights``
skips them, and folds alpha into the weights. Its CLIP output loads only when an ``out_proj`` LoRA is present
(``convert_state_dict_to_diffusers`` sniffs the key type from ``to_out_lora``).

Name and shape logic works on ``meta`` tensors (export); import reads values (block-sparsity of fused layers).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

from .base import TEXT_MODEL, clip_has_text_model, config_value

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
KOHYA_FLUX_PREFIX = {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
"""Kohya name prefix per FLUX.1 pipeline component (sd-scripts ``lora_flux.py``)."""

MLP_RATIO = 4.0
"""diffusers' ``FluxSingleTransformerBlock`` default; ``FluxTransformer2DModel`` does not pass another."""

FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")
"""Default transformer targets of diffusers' ``train_dreambooth_lora_flux_advanced.py`` (peft suffix matching)."""
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# diffusers leaf inside a block -> (BFL leaf, part index in the fused BFL linear or None)
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_BLOCKS = {"transformer_blocks": ("double_blocks", _DOUBLE, "num_layers"),
           "single_transformer_blocks": ("single_blocks", _SINGLE, "num_single_layers")}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})  # output rows: BFL (shift, scale), diffusers (scale, shift)
_ALPHA_BAKED = frozenset({"final_layer.linear", "final_layer.adaLN_modulation.1"})  # diffusers ignores their alpha
_FUSED_PARTS = {"qkv": 3, "linear1": 4}

_CLIP_LEAF = re.compile(r"^encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_T5_LEAF = re.compile(r"^encoder\.block\.\d+\.layer\."
                      r"(?:0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo))$")
_SUPPORTED = ("FLUX.1 kohya names exist for transformer_blocks.N.{attn.to_q|to_k|to_v|add_q_proj|add_k_proj|"
              "add_v_proj|to_out.0|to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2, "
              "norm1.linear, norm1_context.linear}, single_transformer_blocks.N.{attn.to_q|to_k|to_v, proj_mlp, "
              "proj_out, norm.linear} and " + ", ".join(_TOP))


class BflTarget(NamedTuple):
    """Where a diffusers module lives in BFL's model: a BFL path and, for fused linears, its part."""

    path: str  # e.g. "double_blocks.0.img_attn.qkv"
    part: int | None  # index inside the fused linear (q, k, v[, mlp]); None when not fused
    parts: int  # number of parts of the BFL linear (1 when not fused)


class FluxDims(NamedTuple):
    """The output sizes of the fused linears' parts: q / k / v are ``inner_dim``, ``proj_mlp`` ``mlp_hidden_dim``."""

    inner_dim: int
    mlp_hidden_dim: int

    def sizes(self, parts: int) -> tuple[int, ...]:
        """Row sizes of a fused linear with ``parts`` parts (3: qkv, 4: single-block linear1)."""
        return (self.inner_dim,) * 3 + ((self.mlp_hidden_dim,) if parts == 4 else ())


@dataclass(frozen=True)
class FluxLoraLayer:
    """One imported LoRA layer on a diffusers module: ``delta = B @ A * alpha / rank``."""

    component: str
    module: str
    A: Any  # [rank, in]
    B: Any  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Any:
        """The weight change this layer adds to its module."""
        return (self.B.float() @ self.A.float()) * (self.alpha / self.rank)


def _get(cfg: Any, key: str, default: Any = KeyError) -> Any:
    return config_value(cfg, key, default, what="FLUX transformer config (pass transformer.config or its config.json)")


def flux_dev_config() -> dict[str, Any]:
    """FLUX.1-dev's ``transformer/config.json``: ``FluxTransformer2DModel`` arguments, shape checks w/o weights."""
    return {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}


def flux_dims(config: Any) -> FluxDims:
    """Part sizes of the fused linears from a transformer config (``inner = heads * head_dim``, mlp ``4 * inner``)."""
    inner = int(_get(config, "num_attention_heads")) * int(_get(config, "attention_head_dim"))
    return FluxDims(inner, int(inner * float(_get(config, "mlp_ratio", MLP_RATIO))))


def diffusers_to_bfl(module: str, config: Any | None = None) -> BflTarget:
    """The BFL path (and fused part) of a ``FluxTransformer2DModel`` module path.

    ``single_transformer_blocks.3.proj_mlp`` -> ``BflTarget("single_blocks.3.linear1", 3, 4)``. With ``config``
    (``transformer.config``) block indices are checked against ``num_layers`` / ``num_single_layers``. Raises
    ``ValueError`` for modules without a BFL name (norms inside attention, ...).
    """
    if not isinstance(module, str) or not module:
        raise ValueError(f"module path must be a non-empty string, not {module!r}")
    if module in _TOP:
        if config is not None and "guidance" in module and not _get(config, "guidance_embeds", False):
            raise ValueError(f"transformer module {module!r}: this config has no guidance embedder")
        return BflTarget(_TOP[module], None, 1)
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
    if m is None or m[3] not in _BLOCKS[m[1]][1]:
        raise ValueError(f"transformer module {module!r} has no FLUX.1 kohya name: {_SUPPORTED}")
    bfl_block, table, count_key = _BLOCKS[m[1]]
    index = int(m[2])
    if config is not None and index >= int(_get(config, count_key)):
        raise ValueError(f"transformer module {module!r}: block {index} is outside this config "
                         f"({count_key}={_get(config, count_key)})")
    leaf, part = table[m[3]]
    parts = _FUSED_PARTS[leaf.rsplit(".", 1)[-1]] if part is not None else 1
    return BflTarget(f"{bfl_block}.{index}.{leaf}", part, parts)


@functools.lru_cache(maxsize=1)
def _bfl_index() -> tuple[dict[str, tuple[str, ...]], dict[str, str], dict[str, str]]:
    """BFL leaf -> diffusers leaves (in part order) for double and single blocks, and top-level BFL -> diffusers."""
    out = []
    for table in (_DOUBLE, _SINGLE):
        leaves: dict[str, dict[int, str]] = {}
        for dleaf, (bleaf, part) in table.items():
            leaves.setdefault(bleaf, {})[part or 0] = dleaf
        out.append({b: tuple(parts[i] for i in sorted(parts)) for b, parts in leaves.items()})
    return out[0], out[1], {v: k for k, v in _TOP.items()}


def bfl_to_diffusers(path: str) -> tuple[str, ...]:
    """The diffusers module(s) of a dotted BFL path, in fused-part order.

    ``single_blocks.0.linear1`` -> ``(single_transformer_blocks.0.attn.to_q, ...to_k, ...to_v, ...proj_mlp)``;
    ``double_blocks.2.img_mlp.0`` -> ``(transformer_blocks.2.ff.net.0.proj,)``. ``ValueError`` for other paths.
    """
    double, single, top = _bfl_index()
    if path in top:
        return (top[path],)
    m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", path)
    table = (double if m[1] == "double_blocks" else single) if m else {}
    if m is None or m[3] not in table:
        raise ValueError(f"{path!r} is not a FLUX.1 (BFL) LoRA-able linear")
    block = "transformer_blocks" if m[1] == "double_blocks" else "single_transformer_blocks"
    return tuple(f"{block}.{int(m[2])}.{leaf}" for leaf in table[m[3]])


def _clip_inner(module: str, component: str = "text_encoder") -> str:
    inner = module.removeprefix(TEXT_MODEL)
    if not _CLIP_LEAF.match(inner):
        raise ValueError(f"{component} module {module!r} has no kohya name: supported are "
                         "[text_model.]encoder.layers.N.self_attn.{q,k,v,out}_proj and .mlp.fc1/fc2")
    return inner


def _t5_path(module: str, component: str = "text_encoder_2") -> str:
    if not _T5_LEAF.match(module):
        raise ValueError(f"{component} module {module!r} has no kohya name: supported are "
                         "encoder.block.N.layer.0.SelfAttention.{q,k,v,o} and "
                         "encoder.block.N.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}")
    return module


def kohya_flux_name(component: str, module: str, config: Any | None = None) -> str:
    """The kohya layer name (no ``.lora_down.weight``) of a module; fused parts share their BFL linear's name."""
    if component == "transformer":
        path = diffusers_to_bfl(module, config).path
    elif component == "text_encoder":
        path = TEXT_MODEL + _clip_inner(module)
    elif component == "text_encoder_2":
        path = _t5_path(module)
    else:
        raise ValueError(f"component {component!r}: FLUX.1 LoRA components are {', '.join(COMPONENTS)}")
    return KOHYA_FLUX_PREFIX[component] + path.replace(".", "_")


# ---------------------------------------------------------------------------------------------------- export


def _f32(t: Any) -> Any:
    """A float32 copy on the CPU (meta tensors stay meta: shapes only)."""
    import torch

    t = t.detach()
    if t.device.type not in ("cpu", "meta"):
        t = t.cpu()
    return t.to(torch.float32).contiguous().clone()


def _scalar(value: float) -> Any:
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def _check_pair(component: str, module: str, pair: Any, rank: int) -> tuple[Any, Any]:
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise ValueError(f"{component}:{module}: expected an (A, B) pair of tensors") from None
    if getattr(a, "ndim", None) != 2 or getattr(b, "ndim", None) != 2:
        raise ValueError(f"{component}:{module}: A and B must be 2-D (linear LoRA), got "
                         f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise ValueError(f"{component}:{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank {rank}")
    return a, b


def _swap_halves(t: Any) -> Any:
    """Swap the two halves of the rows (BFL shift, scale <-> diffusers scale, shift); its own inverse."""
    import torch

    if t.shape[0] % 2:
        raise ValueError(f"final_layer.adaLN_modulation.1 / norm_out.linear: odd output size {t.shape[0]}")
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fused_sizes(path: str, parts: Mapping[int, tuple[str, Any, Any]], n_parts: int,
                 dims: FluxDims | None) -> tuple[int, ...]:
    """Row sizes of a fused linear: from ``dims`` (config) or from the present parts' shapes."""
    if dims is None:
        qkv = [b.shape[0] for j, (_, _, b) in parts.items() if j < 3]
        inner = int(qkv[0]) if qkv else int(next(iter(parts.values()))[1].shape[1])
        mlp = int(parts[3][2].shape[0]) if 3 in parts else int(inner * MLP_RATIO)
        dims = FluxDims(inner, mlp)
    sizes = dims.sizes(n_parts)
    ins = {int(a.shape[1]) for _, a, _ in parts.values()}
    if len(ins) != 1:
        raise ValueError(f"{path}: the fused parts have different input sizes {sorted(ins)}")
    for j, (module, _, b) in parts.items():
        if b.shape[0] != sizes[j]:
            raise ValueError(f"{path}: part {module} has {b.shape[0]} outputs, the fused layout {sizes} expects "
                             f"{sizes[j]}")
    return sizes


def _fuse(path: str, parts: Mapping[int, tuple[str, Any, Any]], n_parts: int, rank: int,
          dims: FluxDims | None) -> tuple[Any, Any, list[str]]:
    """``lora_down`` (present parts' A stacked) and block-diagonal ``lora_up`` of a fused BFL linear."""
    import torch

    sizes = _fused_sizes(path, parts, n_parts, dims)
    present = sorted(parts)
    down = torch.cat([_f32(parts[j][1]) for j in present], dim=0)
    up = torch.zeros(sum(sizes), rank * len(present), dtype=torch.float32, device=down.device)
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    for col, j in enumerate(present):
        up[offsets[j]:offsets[j] + sizes[j], col * rank:(col + 1) * rank] = _f32(parts[j][2])
    return down, up, [parts[j][0] for j in present]


def kohya_flux_lora(layers: Mapping[str, Mapping[str, tuple[Any, Any]]], rank: int, alpha: float, *,
                    config: Any | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Kohya / ComfyUI / Forge FLUX.1 LoRA tensors for ``{component: {module path: (A, B)}}``.

    Returns ``(tensors, modules)``: ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (float32, CPU;
    meta inputs give meta weights) and ``modules``: kohya name -> ``"component:module[,module...]"`` (the diffusers
    modules written into it, in ``lora_down`` row-block order). Fused BFL linears (``img_attn.qkv``,
    ``txt_attn.qkv``, single-block ``linear1``) get ``lora_down`` = the present parts' A stacked (rank ``k * rank``),
    a block-diagonal ``lora_up`` (absent parts' rows zero) and alpha ``k * alpha``; ``final_layer.*`` get the scale
    multiplied into ``lora_up`` and alpha = ``rank``; the rest keep ``rank`` and ``alpha``. Part sizes come from
    ``config`` (``transformer.config``; also checks block indices) or else from the shapes (``proj_mlp``, when
    absent, is ``4 * inner``). ``ValueError`` for modules without a kohya FLUX.1 name, shape or rank mismatches.
    """
    rank, alpha = int(rank), float(alpha)
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    unknown = sorted(set(layers) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"components {unknown}: FLUX.1 LoRA components are {', '.join(COMPONENTS)}")
    dims = flux_dims(config) if config is not None else None
    tensors: dict[str, Any] = {}
    modules: dict[str, str] = {}

    def put(comp: str, name: str, down: Any, up: Any, alpha_value: float, sources: list[str]) -> None:
        if name in modules:
            raise ValueError(f"LoRA modules {modules[name]} and {comp}:{','.join(sources)} share the kohya name {name}")
        modules[name] = f"{comp}:{','.join(sources)}"
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = _scalar(alpha_value)

    fused: dict[str, dict[int, tuple[str, Any, Any]]] = {}
    n_parts: dict[str, int] = {}
    for module, pair in sorted((layers.get("transformer") or {}).items()):
        a, b = _check_pair("transformer", module, pair, rank)
        target = diffusers_to_bfl(module, config)
        if target.part is not None:
            fused.setdefault(target.path, {})[target.part] = (module, a, b)
            n_parts[target.path] = target.parts
            continue
        up = _f32(b)
        if target.path in _SWAPPED:
            up = _swap_halves(up)
        value = alpha
        if target.path in _ALPHA_BAKED:
            up, value = up * (alpha / rank), float(rank)
        put("transformer", KOHYA_FLUX_PREFIX["transformer"] + target.path.replace(".", "_"), _f32(a), up, value,
            [module])
    for path, parts in sorted(fused.items()):
        down, up, sources = _fuse(path, parts, n_parts[path], rank, dims)
        put("transformer", KOHYA_FLUX_PREFIX["transformer"] + path.replace(".", "_"), down, up,
            alpha * len(sources), sources)
    for comp in ("text_encoder", "text_encoder_2"):
        for module, pair in sorted((layers.get(comp) or {}).items()):
            a, b = _check_pair(comp, module, pair, rank)
            put(comp, kohya_flux_name(comp, module), _f32(a), _f32(b), alpha, [module])
    return tensors, modules


def kohya_flux_header(rank: int, alpha: float, modules: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts-style safetensors header entries for a FLUX.1 LoRA (plus caspec's ``modules`` map as JSON)."""
    return {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(int(rank)),
            "ss_network_alpha": repr(float(alpha)), "ss_base_model_version": "flux1",
            "modules": json.dumps(dict(modules), sort_keys=True, separators=(",", ":"))}


# ---------------------------------------------------------------------------------------------------- import

_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
             (".lora_B.weight", "up"), (".alpha", "alpha"))


class _Ref(NamedTuple):
    """A LoRA layer name resolved: its component, the diffusers module(s) (several: fused) and its style."""

    component: str
    modules: tuple[str, ...]
    style: str
    swap: bool = False  # final_layer.adaLN_modulation.1 in BFL row order


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], kind
    return None


@functools.lru_cache(maxsize=1)
def _underscored() -> dict[str, Any]:
    """Underscored leaf -> dotted leaf tables (kohya / OneTrainer write module paths with ``_`` for ``.``)."""
    def und(names: Iterable[str]) -> dict[str, str]:
        return {n.replace(".", "_"): n for n in names}

    double, single, top = _bfl_index()
    return {
        "bfl": {"double_blocks": und(double), "single_blocks": und(single), None: und(top)},
        "diffusers": {"transformer_blocks": und(_DOUBLE), "single_transformer_blocks": und(_SINGLE), None: und(_TOP)},
    }


def _dot(name: str, style: str) -> str | None:
    """An underscored BFL (``style="bfl"``) or diffusers transformer path with its dots back, or None."""
    tables = _underscored()[style]
    if name in tables[None]:
        return tables[None][name]
    m = re.match(r"^([a-z_]+?)_(\d+)_(.+)$", name)
    if m is None or m[1] not in tables or m[3] not in tables[m[1]]:
        return None
    return f"{m[1]}.{int(m[2])}.{tables[m[1]][m[3]]}"


_CLIP_LEAVES = {f"self_attn_{p}_proj": f"self_attn.{p}_proj" for p in ("q", "k", "v", "out")}
_CLIP_LEAVES.update({"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"})


def _clip_dot(name: str) -> str | None:
    m = re.match(r"^(?:text_model_)?encoder_layers_(\d+)_(.+)$", name)
    if m is None or m[2] not in _CLIP_LEAVES:
        return None
    return f"encoder.layers.{int(m[1])}.{_CLIP_LEAVES[m[2]]}"


def _t5_dot(name: str) -> str | None:
    m = re.match(r"^encoder_block_(\d+)_layer_(0_SelfAttention_[qkvo]|1_DenseReluDense_(?:wi_0|wi_1|wi|wo))$", name)
    if m is None:
        return None
    layer, kind, leaf = m[2].split("_", 2)
    return f"encoder.block.{int(m[1])}.layer.{layer}.{kind}.{leaf}"


def _resolve(name: str, clip_prefix: str) -> _Ref | None:
    """Resolve one LoRA layer name (without suffix) in any supported style, or None."""
    def clip(path: str | None, style: str) -> _Ref | None:
        if path is None or not _CLIP_LEAF.match(path.removeprefix(TEXT_MODEL)):
            return None
        return _Ref("text_encoder", (clip_prefix + path.removeprefix(TEXT_MODEL),), style)

    def t5(path: str | None, style: str) -> _Ref | None:
        return _Ref("text_encoder_2", (path,), style) if path is not None and _T5_LEAF.match(path) else None

    def bfl(path: str | None, style: str) -> _Ref | None:
        if path is None:
            return None
        try:
            return _Ref("transformer", bfl_to_diffusers(path), style, path in _SWAPPED)
        except ValueError:
            return None

    def diffusers(path: str | None, style: str) -> _Ref | None:
        if path is None:
            return None
        try:
            diffusers_to_bfl(path)
        except ValueError:
            return None
        return _Ref("transformer", (path,), style)

    for prefix, parse in (
        ("lora_unet_", lambda r: bfl(_dot(r, "bfl"), "kohya")),
        ("diffusion_model.", lambda r: bfl(r, "comfyui")),
        ("lora_transformer_", lambda r: diffusers(_dot(r, "diffusers"), "onetrainer")),
        ("transformer.", lambda r: diffusers(r, "diffusers")),
        ("lora_te1_", lambda r: clip(_clip_dot(r), "kohya")),
        ("lora_te_", lambda r: clip(_clip_dot(r), "kohya")),
        ("lora_te3_", lambda r: t5(_t5_dot(r), "kohya")),
        ("lora_te2_", lambda r: t5(_t5_dot(r), "onetrainer")),  # OneTrainer's FLUX.1 T5 name (ComfyUI reads it)
        ("text_encoder.", lambda r: clip(r, "diffusers")),
        ("text_encoder_2.", lambda r: t5(r, "diffusers")),
        ("text_encoders.clip_l.transformer.", lambda r: clip(r, "comfyui")),
        ("text_encoders.t5xxl.transformer.", lambda r: t5(r, "comfyui")),
    ):
        if name.startswith(prefix):
            return parse(name[len(prefix):])
    return None


def _group(tensors: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    groups: dict[str, dict[str, Any]] = {}
    bad = []
    for key, value in tensors.items():
        split = _split_key(key) if isinstance(key, str) else None
        if split is None:
            bad.append(str(key))
            continue
        name, kind = split
        if kind in groups.setdefault(name, {}):
            raise ValueError(f"LoRA layer {name!r} has its {kind} weight twice (e.g. lora_down and lora_A)")
        groups[name][kind] = value
    return groups, bad


def _alpha_of(name: str, parts: Mapping[str, Any], default: float | None) -> float:
    if "alpha" not in parts:
        return float(parts["down"].shape[0]) if default is None else float(default)
    value = parts["alpha"]
    if hasattr(value, "numel"):
        if value.numel() != 1:
            raise ValueError(f"LoRA layer {name!r}: alpha must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    return float(value)


def _split_fused(name: str, ref: _Ref, down: Any, up: Any, alpha: float) -> list[FluxLoraLayer]:
    """Per-part LoRAs of a fused BFL linear; parts whose rows are all zero are left out.

    Block-sparse ``lora_up`` (what :func:`kohya_flux_lora` and kohya's converter write): each part keeps its own
    columns of ``lora_down`` / ``lora_up``, alpha scaled by the part's share of the rank. Dense (sd-scripts training
    on the fused linear): every part gets the whole ``lora_down`` and its rows of ``lora_up``, same alpha.
    """
    total = int(down.shape[0])
    n = len(ref.modules)
    rows, cols_in = int(up.shape[0]), int(down.shape[1])
    if n == 3:
        if rows % 3:
            raise ValueError(f"{name}: fused qkv lora_up has {rows} rows, not a multiple of 3")
        sizes = [rows // 3] * 3
    else:  # linear1: q, k, v are the block width (= input size), the rest is the MLP
        if rows <= 3 * cols_in:
            raise ValueError(f"{name}: linear1 lora_up has {rows} rows, expected 3 * {cols_in} + MLP width")
        sizes = [cols_in] * 3 + [rows - 3 * cols_in]
    blocks, off = [], 0
    for size in sizes:
        blocks.append(up[off:off + size])
        off += size
    used = [(blk != 0).any(dim=0) for blk in blocks]
    counts = [int(u.sum()) for u in used]
    overlap = sum(u.long() for u in used)
    sparse = bool((overlap <= 1).all())
    out = []
    for module, blk, u, count in zip(ref.modules, blocks, used, counts):
        if count == 0:
            continue  # no LoRA on this part (e.g. proj_mlp under the default targets)
        if sparse:
            out.append(FluxLoraLayer(ref.component, module, down[u].contiguous(), blk[:, u].contiguous(),
                                     alpha * count / total))
        else:
            out.append(FluxLoraLayer(ref.component, module, down.contiguous(), blk.contiguous(), alpha))
    return out


def _via_diffusers(tensors: Mapping[str, Any], default_alpha: Mapping[str, float] | None,
                   clip_prefix: str) -> list[FluxLoraLayer]:
    """Formats diffusers converts and this module does not name (XLabs, BFL control, fal Kontext)."""
    from diffusers import FluxPipeline

    try:
        state, alphas = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as exc:  # noqa: BLE001 - diffusers raises assorted errors on foreign files
        raise ValueError(f"not a FLUX.1 LoRA in a known naming style (diffusers: {type(exc).__name__}: {exc}); "
                         f"first keys: {sorted(tensors)[:5]}") from exc
    # diffusers 0.42.1 leaves "transformer." off non-block layers (x_embedder, proj_out, ...): put it back
    state = {k if k.startswith(("transformer.", "text_encoder")) else f"transformer.{k}": v
             for k, v in state.items() if _split_key(k) is not None}
    if alphas:
        state.update({k: v for k, v in alphas.items() if k.endswith(".alpha")})
    if not state:
        raise ValueError(f"not a FLUX.1 LoRA in a known naming style; first keys: {sorted(tensors)[:5]}")
    return _read(state, default_alpha, clip_prefix, fallback=False)


def flux_lora_layers(tensors: Mapping[str, Any], *, default_alpha: Mapping[str, float] | None = None,
                     clip_text_model: bool | None = None) -> list[FluxLoraLayer]:
    """The LoRA layers of a FLUX.1 LoRA file, on diffusers' modules, whatever the naming style.

    Styles: kohya (``lora_unet_<BFL>``, ``lora_te1_`` / ``lora_te_`` CLIP-L, ``lora_te3_`` T5), ComfyUI-native
    (``diffusion_model.<BFL>``, ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``),
    diffusers / peft / ai-toolkit (``transformer.``, ``text_encoder.``, ``text_encoder_2.``), OneTrainer legacy
    (``lora_transformer_<diffusers path>``, ``lora_te2_`` T5); weights ``lora_down`` / ``lora_up`` or ``lora_A`` /
    ``lora_B``. A file in none of these goes through diffusers' ``FluxLoraLoaderMixin.lora_state_dict``.

    Fused BFL linears come back split into their diffusers modules (each with its own delta; all-zero parts left
    out), ``final_layer.adaLN_modulation.1`` with its rows in diffusers' order. Alpha is the file's, else
    ``default_alpha[component]`` (diffusers keeps peft alphas in the safetensors header), else the rank. CLIP paths
    follow this transformers' layout (``clip_text_model``: force with / without ``text_model.``). ``ValueError``
    for keys in no known style, layers missing ``lora_down`` or ``lora_up``, non-scalar alphas, rank mismatches,
    and modules named twice. Result sorted by component, then module.
    """
    if not tensors:
        raise ValueError("empty LoRA state dict")
    clip_prefix = TEXT_MODEL if (clip_has_text_model() if clip_text_model is None else clip_text_model) else ""
    return _read(tensors, default_alpha, clip_prefix, fallback=True)


def _read(tensors: Mapping[str, Any], default_alpha: Mapping[str, float] | None, clip_prefix: str, *,
          fallback: bool) -> list[FluxLoraLayer]:
    groups, bad = _group(tensors)
    refs = {name: _resolve(name, clip_prefix) for name in groups}
    unknown = sorted(bad + [n for n, r in refs.items() if r is None])
    if unknown and fallback and all(r is None for r in refs.values()):  # no key in a style named here
        return _via_diffusers(tensors, default_alpha, clip_prefix)
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA key(s)/layer(s) in no known FLUX.1 style (or not plain LoRA): "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    layers: list[FluxLoraLayer] = []
    for name, parts in groups.items():
        ref = refs[name]
        missing = {"down", "up"} - set(parts)
        if missing:
            raise ValueError(f"LoRA layer {name!r} lacks its {' and '.join(sorted(missing))} weight")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"LoRA layer {name!r}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                             "are not a linear LoRA pair")
        alpha = _alpha_of(name, parts, (default_alpha or {}).get(ref.component))
        if ref.swap:
            up = _swap_halves(up)
        if len(ref.modules) > 1:
            layers.extend(_split_fused(name, ref, down, up, alpha))
        else:
            layers.append(FluxLoraLayer(ref.component, ref.modules[0], down, up, alpha))
    seen: dict[tuple[str, str], int] = {}
    for layer in layers:
        key = (layer.component, layer.module)
        seen[key] = seen.get(key, 0) + 1
    twice = sorted(f"{c}:{m}" for (c, m), n in seen.items() if n > 1)
    if twice:
        raise ValueError(f"modules named by more than one LoRA layer (mixed naming styles?): {twice[:8]}")
    return sorted(layers, key=lambda l: (COMPONENTS.index(l.component), l.module))


_FLUX_MARKERS = re.compile(
    r"(?:^|\.)double_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]\.")  # XLabs (diffusers converts it)


def detect_flux_lora(keys: Iterable[str]) -> bool:
    """Whether a LoRA key set is FLUX.1's (to tell it from the SD families on import).

    True when a key names a BFL block layer (``lora_unet_double_blocks_…``, ``diffusion_model.single_blocks…``), a
    diffusers / OneTrainer single-stream block (``single_transformer_blocks``) or XLabs' processor LoRA.
    Text-encoder keys alone (CLIP-L, T5) and diffusers names on ``transformer_blocks`` only (SD3's names too) are
    not enough. Names only: other BFL-derived models (FLUX.2, Chroma, HunyuanVideo's ``double_blocks``) can share
    some of these names; shapes would be needed to tell them apart.
    """
    for key in keys:
        if not isinstance(key, str):
            continue
        if _FLUX_MARKERS.search(key):
            return True
        split = _split_key(key)
        if split is None:
            continue
        ref = _resolve(split[0], "")
        if ref is None or ref.component != "transformer":
            continue
        in_block = ref.modules[0].startswith(("transformer_blocks.", "single_transformer_blocks."))
        if in_block and ref.style in ("kohya", "comfyui"):  # BFL double_blocks / single_blocks names
            return True
        if ref.modules[0].startswith("single_transformer_blocks."):
            return True
    return False


__all__ = ["COMPONENTS", "KOHYA_FLUX_PREFIX", "FLUX_LORA_TARGETS", "CLIP_LORA_TARGETS", "MLP_RATIO", "BflTarget",
           "FluxDims", "FluxLoraLayer", "flux_dev_config", "flux_dims", "diffusers_to_bfl", "bfl_to_diffusers",
           "kohya_flux_name", "kohya_flux_lora", "kohya_flux_header", "flux_lora_layers", "detect_flux_lora",
           "clip_has_text_model"]
