"""The concept-asset folder: what training writes and what inference loads.

An asset folder holds

* ``embeddings.safetensors`` (format version 2): per text encoder and pseudo-word one float32 tensor
  ``[n, d]``, keyed ``<component>:<token>`` (``text_encoder:<dance1>``; SDXL also
  ``text_encoder_2:<dance1>``), ``n`` = the word's vectors (1 unless ``vectors: N``), ``d`` = that
  encoder's width. Header metadata: ``format`` (``caspec-concept-asset``), ``format_version``,
  ``family`` (``sd1``/``sd2``/``sdxl``), ``encoders`` (JSON list), ``tokens`` (JSON list, in training
  order), ``roles``, ``init_words`` and ``vectors`` (JSON objects token -> value). Version 1 files
  (SD 1.x, one ``[d]`` tensor keyed by the token) are still read;
* ``lora.safetensors``: the LoRA weights in peft's key layout, prefixed by component:
  ``unet.<module path>.lora_A.weight``, ``text_encoder.<module path>.lora_B.weight``,
  ``text_encoder_2.`` (SDXL), ... (from
  ``peft.get_peft_model_state_dict``; the same layout diffusers' ``load_lora_weights`` reads for
  peft-style files). Header metadata: ``lora_rank``, ``lora_alpha``, ``unet_targets``,
  ``text_targets`` (JSON lists). No keys when training had no LoRA phase;
* ``card.yaml``: provenance, written by the caller with :func:`write_card`;
* ``loss.jsonl``: one JSON object per optimizer step (``step``, ``phase``, ``loss``, ``lr``);
* ``previews/``: ``step-XXXXXX-<i>.png``.

:func:`load_asset` reads a folder into an :class:`Asset`; :func:`apply_asset` adds its tokens,
embedding rows and LoRA adapters (named after the asset) to a pipe that the caller owns (load it
with ``load_pipeline(..., fresh=True)``: the shared cached pipe must never be changed).

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..fsutil import atomic_write_bytes, atomic_write_text

EMBEDDINGS_FILE = "embeddings.safetensors"
LORA_FILE = "lora.safetensors"
CARD_FILE = "card.yaml"
LOSS_FILE = "loss.jsonl"
PREVIEWS_DIR = "previews"
FORMAT_NAME = "caspec-concept-asset"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer")
"""LoRA key prefixes, in file order: every family's (``text_encoder_2``: SDXL, FLUX.1's T5; ``transformer``: FLUX.1)."""
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
HEADER_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
"""Components every export header lists targets for (others only when they have targets: headers keep their bytes)."""


# ---------------------------------------------------------------------------------------------
# card and loss log


def write_card(out_dir: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``card`` as ``out_dir/card.yaml`` (YAML, keys in the given order, atomically)."""
    import yaml

    text = yaml.safe_dump(_plain(card), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return atomic_write_text(Path(out_dir) / CARD_FILE, text)


def _plain(value: Any) -> Any:
    """Tuples, Paths and numpy/torch scalars to YAML-safe plain values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def write_loss_log(out_dir: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``loss.jsonl``: one compact JSON object per line."""
    lines = "".join(json.dumps(dict(r), sort_keys=True, separators=(",", ":")) + "\n" for r in records)
    return atomic_write_text(Path(out_dir) / LOSS_FILE, lines)


def read_loss_log(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / LOSS_FILE
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# the asset


@dataclass
class Asset:
    """A loaded concept asset (tensors on the CPU, float32).

    ``embeddings`` holds the first text encoder's vectors, ``embeddings_2`` SDXL's second encoder's (empty
    otherwise): token -> ``[d]`` for a one-vector word, ``[n, d]`` for a word of ``n`` vectors."""

    name: str
    tokens: list[str]
    roles: dict[str, str]
    init_words: dict[str, str]
    embeddings: dict[str, Any]  # token -> tensor [d] or [n, d] (text_encoder)
    lora: dict[str, dict[str, Any]]  # component (see COMPONENTS) -> peft state dict
    lora_rank: int
    lora_alpha: float
    targets: dict[str, list[str]] = field(default_factory=dict)  # component -> target module names
    card: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    family: str = "sd1"
    embeddings_2: dict[str, Any] = field(default_factory=dict)  # token -> tensor (SDXL's text_encoder_2)
    unet_layout: dict[str, Any] = field(default_factory=dict)  # SDXL: the UNet's block layout (kohya names)

    @property
    def adapter_name(self) -> str:
        return adapter_name_for(self.name)

    @property
    def has_lora(self) -> bool:
        return any(self.lora.get(c) for c in COMPONENTS)

    @property
    def encoders(self) -> list[str]:
        """The text-encoder components this asset has vectors for."""
        return ["text_encoder"] + (["text_encoder_2"] if self.embeddings_2 else [])

    def rows(self, token: str, encoder: str = "text_encoder") -> Any:
        """``token``'s vectors for ``encoder`` as ``[n, d]``."""
        table = self.embeddings if encoder == "text_encoder" else self.embeddings_2
        t = table[token]
        return t.reshape(1, -1) if t.ndim == 1 else t

    def vectors(self, token: str) -> int:
        """How many vectors ``token`` has (1: the paper's setting)."""
        return int(self.rows(token).shape[0])


def adapter_name_for(name: str) -> str:
    """A peft adapter name for an asset name (no dots: adapter names become module-dict keys)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return clean or "asset"


def save_asset(
    out_dir: str | Path,
    *,
    tokens: list[str],
    roles: Mapping[str, str],
    init_words: Mapping[str, str],
    embeddings: Mapping[str, Any],
    lora: Mapping[str, Mapping[str, Any]],
    lora_rank: int,
    lora_alpha: float,
    targets: Mapping[str, Iterable[str]],
    family: str = "sd1",
    embeddings_2: Mapping[str, Any] | None = None,
    unet_layout: Mapping[str, Any] | None = None,
) -> None:
    """Write ``embeddings.safetensors`` and ``lora.safetensors`` into ``out_dir`` (atomically).

    ``embeddings`` (and, for SDXL, ``embeddings_2``): token -> tensor ``[d]`` or ``[n, d]``; ``lora``:
    component -> peft state dict (keys as ``get_peft_model_state_dict`` gives them). Tensors are saved
    float32, contiguous, CPU.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"text_encoder": embeddings, **({"text_encoder_2": embeddings_2} if embeddings_2 else {})}
    emb: dict[str, torch.Tensor] = {}
    vectors: dict[str, int] = {}
    for comp, table in tables.items():
        for tok in tokens:
            t = table[tok].detach().to("cpu", torch.float32)
            t = (t.reshape(1, -1) if t.ndim == 1 else t).contiguous().clone()
            if vectors.setdefault(tok, int(t.shape[0])) != t.shape[0]:
                raise ValueError(f"pseudo-word {tok} has {vectors[tok]} vectors in one text encoder and "
                                 f"{t.shape[0]} in another")
            emb[f"{comp}:{tok}"] = t
    emb_meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "family": str(family),
        "encoders": json.dumps(list(tables)),
        "tokens": json.dumps(list(tokens)),
        "roles": json.dumps({t: roles[t] for t in tokens}, sort_keys=True),
        "init_words": json.dumps({t: init_words[t] for t in tokens}, sort_keys=True),
        "vectors": json.dumps(vectors, sort_keys=True),
    }
    atomic_write_bytes(out / EMBEDDINGS_FILE, safetensors_bytes(emb, emb_meta))

    flat: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        for key, value in sorted((lora.get(comp) or {}).items()):
            flat[f"{comp}.{key}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    lora_meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "lora_rank": str(int(lora_rank)),
        "lora_alpha": repr(float(lora_alpha)),
        "unet_targets": json.dumps(list(targets.get("unet") or targets.get("transformer") or [])),  # the denoiser's
        "text_targets": json.dumps(list(targets.get("text_encoder", []))),
    }
    if lora.get("text_encoder_2"):
        lora_meta["text_2_targets"] = json.dumps(list(targets.get("text_encoder_2", [])))
    if unet_layout:
        lora_meta["unet_layout"] = json.dumps(dict(unet_layout), sort_keys=True)
    atomic_write_bytes(out / LORA_FILE, safetensors_bytes(flat, lora_meta))


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file with a canonical layout: header keys sorted, tensors stored in key order.

    ``safetensors.torch.save`` orders the header's metadata by a hash map, so equal inputs can give
    different bytes; this writer gives the same bytes for the same tensors and metadata (and any
    safetensors reader loads it).
    """
    import torch

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"cannot store tensor {name!r} of dtype {t.dtype} in safetensors")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = dict(fh.metadata() or {})
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, meta


def load_asset(path: str | Path, *, name: str | None = None) -> Asset:
    """Read an asset folder. ``name`` (default: the folder's name) names its LoRA adapters."""
    import yaml

    folder = Path(path)
    emb_path, lora_path = folder / EMBEDDINGS_FILE, folder / LORA_FILE
    if not emb_path.is_file():
        raise ValueError(f"`{folder}` is not a concept asset: {EMBEDDINGS_FILE} is missing")
    try:
        emb, emb_meta = _read_safetensors(emb_path)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {emb_path}: {type(exc).__name__}: {exc}") from None
    if emb_meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{emb_path} is not a caspec concept-asset file (format {emb_meta.get('format')!r})")
    version = emb_meta.get("format_version", "1")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{emb_path}: asset format version {version} is newer than this caspec reads "
                         f"({', '.join(READABLE_VERSIONS)}): upgrade caspec")
    try:
        tokens = list(json.loads(emb_meta["tokens"]))
        roles = dict(json.loads(emb_meta.get("roles", "{}")))
        init_words = dict(json.loads(emb_meta.get("init_words", "{}")))
        encoders = list(json.loads(emb_meta.get("encoders", '["text_encoder"]')))
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{emb_path}: bad header metadata ({exc})") from None
    from ..spec.models import TOKEN, is_pseudo_word

    bad = [t for t in tokens if not is_pseudo_word(t)]
    if bad:
        raise ValueError(f"{emb_path}: pseudo-word {bad[0]!r} in the header does not follow the grammar {TOKEN} "
                         "(angle brackets around letters, digits, `_`, `.`, `-`)")
    family = emb_meta.get("family", "sd1")
    tables: dict[str, dict[str, Any]] = {}
    if version == "1":
        tables["text_encoder"] = emb
    else:
        for key, value in emb.items():
            comp, sep, tok = key.partition(":")
            if not sep or comp not in encoders:
                raise ValueError(f"{emb_path}: key {key!r} is not `<text encoder>:<token>` "
                                 f"(encoders: {', '.join(encoders)})")
            tables.setdefault(comp, {})[tok] = value[0] if value.ndim == 2 and value.shape[0] == 1 else value
    for comp in encoders:
        table = tables.get(comp, {})
        if sorted(tokens) != sorted(table):
            raise ValueError(f"{emb_path}: the {comp} tensors ({sorted(table)}) do not match the listed tokens "
                             f"({tokens})")
        dims = {int(t.shape[-1]) for t in table.values()}
        if len(dims) != 1 or any(t.ndim not in (1, 2) for t in table.values()):
            raise ValueError(f"{emb_path}: every {comp} embedding must be [d] or [n, d] with one width d, got "
                             f"{sorted(tuple(t.shape) for t in table.values())}")
    emb = tables.get("text_encoder", {})

    lora: dict[str, dict[str, Any]] = {c: {} for c in HEADER_COMPONENTS}  # others (FLUX.1's transformer) when present
    rank, alpha, targets, layout = 0, 0.0, {c: [] for c in HEADER_COMPONENTS}, {}
    if lora_path.is_file():
        try:
            flat, lora_meta = _read_safetensors(lora_path)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read {lora_path}: {type(exc).__name__}: {exc}") from None
        for key, value in flat.items():
            comp, _, rest = key.partition(".")
            if comp not in COMPONENTS or not rest:
                raise ValueError(f"{lora_path}: key {key!r} does not start with one of {', '.join(COMPONENTS)}")
            lora.setdefault(comp, {})[rest] = value
        try:
            rank = int(lora_meta.get("lora_rank", "0"))
            alpha = float(lora_meta.get("lora_alpha", "0"))
            from ..families import get as family_of

            targets = {family_of(family).denoiser: list(json.loads(lora_meta.get("unet_targets", "[]"))),
                       "text_encoder": list(json.loads(lora_meta.get("text_targets", "[]")))}
            if lora["text_encoder_2"]:
                targets["text_encoder_2"] = list(json.loads(lora_meta.get("text_2_targets", "[]")))
            layout = dict(json.loads(lora_meta.get("unet_layout", "{}")))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{lora_path}: bad header metadata ({exc})") from None
        if any(lora.values()) and (rank < 1 or alpha <= 0):
            raise ValueError(f"{lora_path}: lora_rank/lora_alpha missing from the header")
    card: dict[str, Any] = {}
    if (folder / CARD_FILE).is_file():
        card = yaml.safe_load((folder / CARD_FILE).read_text(encoding="utf-8")) or {}
    return Asset(name=name or folder.name, tokens=tokens, roles=roles, init_words=init_words, embeddings=emb,
                 lora=lora, lora_rank=rank, lora_alpha=alpha, targets=targets, card=card, path=folder,
                 family=family, embeddings_2=tables.get("text_encoder_2", {}), unet_layout=layout)


# ---------------------------------------------------------------------------------------------
# putting tokens and adapters into a model (shared with the trainer)


def add_new_tokens(tokenizer: Any, text_encoder: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to the tokenizer (each must be new) and grow the text encoder's embedding table.

    Returns the new ids (in ``tokens`` order). The new rows' values are left to the caller.
    """
    import torch

    if len(set(tokens)) != len(tokens):
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        raise ValueError(f"pseudo-word(s) listed twice: {', '.join(dup)}")
    vocab = tokenizer.get_vocab()
    for tok in tokens:
        if tok in vocab:
            raise ValueError(f"token {tok!r} already exists in the tokenizer: choose another pseudo-word "
                             "(one not in the vocabulary and not added by another asset)")
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        vocab = tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        raise ValueError(f"the tokenizer added {added} of {len(tokens)} pseudo-words"
                         + (f"; not added: {', '.join(missing)}" if missing else "")
                         + " (does one of them already exist?)")
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]
    for tok, i in zip(tokens, ids):
        got = tokenizer(tok, add_special_tokens=False).input_ids
        if list(got) != [i]:
            raise ValueError(f"pseudo-word {tok!r} does not tokenize to its own single token (got ids {list(got)})")
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    need = max(len(tokenizer), max(ids) + 1)
    if need > rows:
        with torch.random.fork_rng(devices=[]):  # resizing may draw random rows: never disturb the caller's RNG
            text_encoder.resize_token_embeddings(need, mean_resizing=False)
    return ids


def first_token_id(tokenizer: Any, word: str, *, token: str = "") -> int:
    """The id of the first token of ``word`` (its embedding row seeds a new pseudo-word)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer word {word!r}{f' (for {token})' if token else ''} tokenizes to nothing: "
                         "choose an ordinary word")
    return int(ids[0])


def lora_config(rank: int, alpha: float, targets: Iterable[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                      target_modules=list(targets))


def check_targets(module: Any, targets: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` naming any target that matches no Linear/Conv module (peft's suffix rule)."""
    import torch

    names = [(n, m) for n, m in module.named_modules() if n]
    for target in targets:
        hits = [m for n, m in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"{what} has no module named {target!r} (LoRA target); "
                             f"check the target list (e.g. for the UNet: to_q, to_k, to_v, to_out.0; "
                             f"for the text encoder: q_proj, k_proj, v_proj, out_proj)")
        if not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or _is_tuner_layer(m) for m in hits):
            raise ValueError(f"{what}: module {target!r} is a {type(hits[0]).__name__}, not a Linear/Conv2d layer "
                             "that LoRA can adapt")


def _is_tuner_layer(m: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(m, BaseTunerLayer)


def tuner_layers(module: Any) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def inject_lora(module: Any, config: Any, adapter_name: str, *, trainable: bool) -> None:
    """Inject a LoRA adapter into ``module`` with ``peft.inject_adapter_in_model``.

    Adapters already there stay active alongside the new one (several assets compose), and their
    configs are kept in ``module.peft_config``. ``trainable``: whether the new adapter's weights
    require grad (base weights are never touched).
    """
    from peft import inject_adapter_in_model

    existing = dict(getattr(module, "peft_config", {}) or {})
    if adapter_name in existing:
        raise ValueError(f"{type(module).__name__} already has a LoRA adapter named {adapter_name!r}")
    before_active = {n: list(m.active_adapters) for n, m in tuner_layers(module)}
    base_grad = {n: p.requires_grad for n, p in module.named_parameters()}
    import warnings

    with warnings.catch_warnings():
        # peft warns when a model already holds adapters: composing several is what we want here
        warnings.filterwarnings("ignore", message=".*[Aa]lready found a `peft_config`.*")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    module.peft_config = {**existing, adapter_name: config}
    # the flags diffusers' / transformers' adapter helpers look for (set_adapters, disable_adapters...)
    module._hf_peft_config_loaded = True
    for n, layer in tuner_layers(module):
        names = [a for a in before_active.get(n, []) if a in layer.scaling] + [adapter_name]
        layer.set_adapter(list(dict.fromkeys(names)), inference_mode=True)
    for n, p in module.named_parameters():
        if n in base_grad:
            p.requires_grad_(base_grad[n])  # untouched (peft freezes non-adapter parameters)
        elif f".{adapter_name}." in n:
            p.requires_grad_(trainable)


def set_lora_scale(module: Any, adapter_name: str, scale: float) -> None:
    """Scale adapter ``adapter_name``'s delta in ``module`` to ``scale`` × (alpha / rank)."""
    for _, layer in tuner_layers(module):
        if hasattr(layer, "set_scale"):
            layer.set_scale(adapter_name, float(scale))


def lora_state_dict(module: Any, adapter_name: str) -> dict[str, Any]:
    """The adapter's weights in peft's key layout (adapter name removed)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=adapter_name)


def load_lora_state(module: Any, state: Mapping[str, Any], adapter_name: str) -> None:
    """Load a peft-layout state dict into an injected adapter, insisting every key lands."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, dict(state), adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"LoRA weights do not fit the model: unexpected keys {unexpected[:3]}...")
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{adapter_name}." in k
               and "lora_" in k]
    if missing:
        raise ValueError(f"LoRA weights do not fit the model: missing keys {missing[:3]}...")


def add_pseudo_words(pipe: Any, vectors: Mapping[str, int]) -> dict[str, list[int]]:
    """Add each pseudo-word (with its sub-tokens ``<w>_1``, ... when it has several vectors) to every text
    encoder's tokenizer and table, and register multi-vector words in ``pipe.expansions``.

    Returns component -> the new ids, in ``vectors`` order with each word's sub-tokens in order."""
    from ..models.text import sub_tokens

    subs = {tok: sub_tokens(tok, n) for tok, n in vectors.items()}
    flat = [t for tok in vectors for t in subs[tok]]
    ids = {comp: add_new_tokens(tok, te, flat) for comp, tok, te in pipe.text_encoders}
    for tok, sub in subs.items():
        if len(sub) > 1:
            pipe.expansions[tok] = sub
    return ids


def check_family(asset: Asset, family: str, what: str = "this model") -> None:
    """Refuse an asset trained on another model family (:mod:`caspec.families`), naming both."""
    from ..families import describe

    if (asset.family or "sd1") != (family or "sd1"):
        raise ValueError(f"asset {asset.name} was trained on an {describe(asset.family)} model, but {what} is "
                         f"{describe(family)}: an asset only works with the family (and base model) it was "
                         "trained on; train it again on this model")


def apply_asset(pipe: Any, asset: Asset, *, lora_scale: float | Mapping[str, float] = 1.0,
                adapter_name: str | None = None) -> str:
    """Add ``asset``'s pseudo-words and LoRA adapters to ``pipe`` (which the caller owns: use a fresh pipe).

    ``lora_scale`` multiplies the LoRA delta (alpha / rank); one number for every component or a
    mapping ``{"unet": w, "text_encoder": w, ...}``. The adapters are named ``adapter_name`` (default: the
    asset's name, see :func:`adapter_name_for`) and stay active alongside adapters added before.
    Multi-vector words are expanded in prompts (``pipe.expansions``). Returns the adapter name.
    """
    import torch

    name = adapter_name_for(adapter_name or asset.name)
    check_family(asset, getattr(pipe, "family", "sd1"))
    encoders = {comp: te for comp, _, te in pipe.text_encoders}
    missing = [c for c in encoders if c not in asset.encoders]
    if missing:
        raise ValueError(f"asset {asset.name} has no vectors for {', '.join(missing)} (trained on another model "
                         "family?)")
    for comp, te in encoders.items():
        d = te.get_input_embeddings().weight.shape[1]
        for tok in asset.tokens:
            rows = asset.rows(tok, comp)
            if rows.shape[1] != d:
                raise ValueError(f"asset {asset.name}: the {comp} embedding of {tok} has width {rows.shape[1]}, "
                                 f"but this model's {comp} has width {d} (trained on another base model?)")
    modules = dict(pipe.lora_modules)
    if asset.has_lora:
        for comp, module in modules.items():
            if name in (getattr(module, "peft_config", {}) or {}):
                raise ValueError(f"the {comp} already has an adapter named {name!r}: give another adapter_name")
    ids = add_pseudo_words(pipe, {tok: asset.vectors(tok) for tok in asset.tokens})
    for comp, te in encoders.items():
        weight = te.get_input_embeddings().weight
        rows = torch.cat([asset.rows(tok, comp) for tok in asset.tokens])
        with torch.no_grad():
            weight[torch.tensor(ids[comp], device=weight.device)] = rows.to(device=weight.device, dtype=weight.dtype)
    scales = lora_scale if isinstance(lora_scale, Mapping) else {c: float(lora_scale) for c in COMPONENTS}
    for comp in COMPONENTS:
        state = asset.lora.get(comp) or {}
        if not state:
            continue
        if comp not in modules:
            raise ValueError(f"asset {asset.name} has LoRA weights for {comp}, which this model does not have")
        module = modules[comp]
        targets = asset.targets.get(comp) or _targets_from_keys(state)
        check_targets(module, targets, f"the {comp}")
        inject_lora(module, lora_config(asset.lora_rank, asset.lora_alpha, targets), name, trainable=False)
        device = next(module.parameters()).device
        load_lora_state(module, {k: v.to(device) for k, v in state.items()}, name)
        set_lora_scale(module, name, float(scales.get(comp, scales.get("text_encoder", 1.0))))
    return name


def _targets_from_keys(state: Mapping[str, Any]) -> list[str]:
    """Module paths adapted by a peft state dict (used when the header lists no targets)."""
    out = []
    for key in state:
        stem = key.split(".lora_")[0]
        if stem not in out:
            out.append(stem)
    return out


__all__ = ["Asset", "EMBEDDINGS_FILE", "LORA_FILE", "CARD_FILE", "LOSS_FILE", "PREVIEWS_DIR", "COMPONENTS",
           "save_asset", "load_asset", "apply_asset", "write_card", "write_loss_log", "read_loss_log",
           "adapter_name_for", "safetensors_bytes", "add_new_tokens", "add_pseudo_words", "check_family",
           "TEXT_COMPONENTS", "HEADER_COMPONENTS", "first_token_id", "lora_config", "check_targets", "inject_lora",
           "set_lora_scale", "lora_state_dict", "load_lora_state", "atomic_write_bytes", "atomic_write_text"]
