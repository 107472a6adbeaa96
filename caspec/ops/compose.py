"""Step kind `compose`: images from prompts that mix the pseudo-words of several concept assets.

One pipeline is loaded once with every asset's embeddings and LoRA adapters (one adapter per asset);
per prompt, the adapters' scales follow the paper (section 3.4): the asset whose pseudo-word comes first
in the prompt at `first_scale` (0.8), each later one at `later_scale` (0.5), unused ones at 0 — so an
asset a prompt does not use contributes nothing to it. `asset_scales` fixes an asset's scale instead.
`lora_windows` confines an asset's denoiser LoRA to a span of the sampling trajectory (t/T), applied by
the sampler's per-step hook (:func:`window_hook`), on every family.
Assets come from `concepts` steps (upstream) or asset folders (paths, hashed into the key).

With `baseline` (the default), each prompt that uses an asset is also drawn as plain words (:func:`plain_words`:
`a red <mystar>` -> `a red star`) on the same seeds with every adapter at 0, and the images of the `roots` step
each asset descends from are copied in (upstream as ``root{i}``, :meth:`ComposeOp.shown_upstream`). The contact
sheet (``index.html``) shows root | plain prompt | concept per prompt, seed for seed; ``eval`` measures both.
The result keeps them apart from ``images`` (``baseline``, ``roots``), so what reads ``images`` is unchanged.
"""
from __future__ import annotations

import html
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import StepFailed
from ..spec.load import is_asset_path
from ..spec.models import sampling_for
from .base import Op, RunContext, image_entry
from .images import pixel_digest, save_png
from .seeds import derive_seed

ASSET_FILES = ("card.yaml", "embeddings.safetensors", "lora.safetensors")
_WORD = re.compile(r"<[^<>\s]+>")


def image_seeds(base: int, prompt: str, images: int, *, same_seeds: bool = False) -> list[int]:
    """The seeds of a prompt's images: from the prompt, or (``same_seeds``) from the prompt with every
    pseudo-word masked, so that "a red <x>" and "a red <y>" share their seeds."""
    text = _WORD.sub("<*>", prompt) if same_seeds else prompt
    return [derive_seed(base, "compose", text, k) for k in range(images)]


class ComposeOp(Op):
    KIND = "compose"
    VERSION = 3  # 2: PNGs no longer carry the step key or caspec version; 3: `baseline` (plain prompts, roots)

    USES_FAMILY = True

    def params(self, step: Any, spec: Any, family: Any = None) -> dict[str, Any]:
        # `same_seeds` enters the key only when set, so older keys stay valid
        return {**sampling_for(spec, step, family), "prompts": list(step.prompts), "images": step.images,
                "first_scale": step.first_scale, "later_scale": step.later_scale,
                "asset_scales": [step.asset_scales.get(a) for a in step.assets],
                "assets": [{"source": "path" if is_asset_path(a) else "step"} for a in step.assets],
                "baseline": step.baseline, **({"same_seeds": True} if step.same_seeds else {}),
                **({"lora_windows": [step.lora_windows.get(a) for a in step.assets]} if step.lora_windows else {})}

    def inputs(self, step: Any, spec_dir: Path) -> dict[str, Path]:
        return {f"asset{i}/{name}": (spec_dir / a / name).resolve()
                for i, a in enumerate(step.assets) if is_asset_path(a) for name in ASSET_FILES}

    def upstream(self, step: Any) -> dict[str, str]:
        return {f"asset{i}": a for i, a in enumerate(step.assets) if not is_asset_path(a)}

    def shown_upstream(self, step: Any, spec: Any) -> dict[str, str]:
        """With `baseline`: the `roots` step each `concepts`-step asset descends from, as ``root{i}``."""
        if not step.baseline:
            return {}
        return {f"root{i}": root for i, a in enumerate(step.assets) if not is_asset_path(a)
                for root in spec.roots_of(a)}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from ..assets.format import apply_asset, load_asset
        from ..models.load import load_pipeline

        p = ctx.params
        pipe = load_pipeline(ctx.model, ctx.spec_dir, fresh=True)
        with tempfile.TemporaryDirectory(prefix="caspec-compose-") as tmp:
            assets = [load_asset(folder, name=f"asset{i}") for i, folder in enumerate(self._folders(ctx, Path(tmp)))]
        ctx.extra.setdefault("model_family", pipe.family)
        for i, asset in enumerate(assets):
            _check_base(ctx, i, asset)
            apply_asset(pipe, asset, lora_scale=0.0, adapter_name=f"asset{i}")
        _check_prompts(ctx, pipe, assets)
        windows = resolved_windows(ctx, p.get("lora_windows"), assets)
        entries: list[dict[str, Any]] = []
        for j, prompt in enumerate(p["prompts"]):
            scales = prompt_scales(prompt, [a.tokens for a in assets], p["first_scale"], p["later_scale"],
                                   p["asset_scales"])
            set_scales(pipe, scales)
            pipe.step_hook = window_hook(pipe, scales, windows)
            try:
                entries += self._render(ctx, pipe, j, prompt, scales, assets)
            finally:
                pipe.step_hook = None
            ctx.progress(len(entries), len(p["prompts"]) * p["images"], f"{ctx.step_id}: {prompt[:40]}")
        if not p.get("baseline"):
            _contact_sheet(ctx.out_dir, entries)
            return {"images": entries}
        set_scales(pipe, [0.0] * len(assets))
        baseline = self._render_plain(ctx, pipe, entries, assets)
        roots = copy_roots(ctx)
        _contact_sheet(ctx.out_dir, entries, baseline, roots)
        return {"images": entries, "baseline": baseline, "roots": roots}

    def _folders(self, ctx: RunContext, tmp: Path) -> list[Path]:
        return [asset_folder(ctx, f"asset{i}", tmp) for i in range(len(ctx.params["assets"]))]

    def _render_plain(self, ctx: RunContext, pipe: Any, entries: list[dict[str, Any]],
                      assets: list[Any]) -> list[dict[str, Any]]:
        """The plain-prompt twin of every image that uses an asset: the prompt in plain words, its seed, no
        adapter. Each concept image entry gets ``baseline`` (its twin's id); twins shared by several prompts
        (same plain words and seed, e.g. with ``same_seeds``) are drawn once."""
        p = ctx.params
        words = {tok: a.init_words.get(tok) or "" for a in assets for tok in a.tokens}
        wanted: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for e in entries:
            if e["assets"]:
                wanted.setdefault((plain_words(e["prompt"], words), e["seed"]), []).append(e)
        out = []
        for n, ((plain, seed), users) in enumerate(wanted.items()):
            img = pipe.kind.txt2img(pipe, [plain], [seed], steps=p["steps"], guidance_scale=p["guidance_scale"],
                                    negative_prompt=p["negative_prompt"], resolution=p["resolution"],
                                    true_cfg_scale=p.get("true_cfg_scale"))[0]
            iid = f"{users[0]['id']}-plain"  # sorts next to its first concept image
            save_png(ctx.out_dir / f"{iid}.png", img, {
                "prompt": plain, "negative_prompt": p["negative_prompt"], "seed": seed, "steps": p["steps"],
                "guidance_scale": p["guidance_scale"], "assets": [], "step": ctx.step_id, "id": iid,
                "model": ctx.model.base})
            out.append(image_entry(iid, f"{iid}.png", prompt=plain, seed=seed, plain_of=[u["id"] for u in users],
                                   digest=pixel_digest(img)))
            for u in users:
                u["baseline"] = iid
            ctx.progress(len(entries) + n + 1, len(entries) + len(wanted), f"{ctx.step_id}: plain prompt {plain[:40]}")
        return out

    def _render(self, ctx: RunContext, pipe: Any, j: int, prompt: str, scales: list[float],
                assets: list[Any]) -> list[dict[str, Any]]:
        p = ctx.params
        seeds = image_seeds(p["seed"], prompt, p["images"], same_seeds=p.get("same_seeds", False))
        images = pipe.kind.txt2img(pipe, [prompt] * len(seeds), seeds, steps=p["steps"],
                                   guidance_scale=p["guidance_scale"], negative_prompt=p["negative_prompt"],
                                   resolution=p["resolution"], true_cfg_scale=p.get("true_cfg_scale"))
        names = list(getattr(ctx.extra.get("step"), "assets", [])) or [f"asset{i}" for i in range(len(scales))]
        used = [{"asset": names[i], "scale": s} for i, s in enumerate(scales) if s > 0]
        out = []
        for k, (img, seed) in enumerate(zip(images, seeds)):
            iid = f"p{j}-c{k}"
            save_png(ctx.out_dir / f"{iid}.png", img, {
                "prompt": prompt, "negative_prompt": p["negative_prompt"], "seed": seed, "steps": p["steps"],
                "guidance_scale": p["guidance_scale"], "assets": used, "step": ctx.step_id,
                "id": iid, "model": ctx.model.base})
            out.append(image_entry(iid, f"{iid}.png", prompt=prompt, seed=seed, prompt_index=j, candidate=k,
                                   assets=used, digest=pixel_digest(img)))
        return out


def prompt_scales(prompt: str, tokens: list[list[str]], first: float, later: float,
                  fixed: list[float | None]) -> list[float]:
    """LoRA scale per asset for one prompt: by order of first occurrence of the asset's pseudo-words
    (first asset `first`, later ones `later`), a fixed scale where given, 0 for assets the prompt does not use."""
    owner = {tok: i for i, toks in enumerate(tokens) for tok in toks}
    order: list[int] = []
    for word in _WORD.findall(prompt):
        i = owner.get(word)
        if i is not None and i not in order:
            order.append(i)
    scales = [0.0] * len(tokens)
    for rank, i in enumerate(order):
        scales[i] = fixed[i] if fixed[i] is not None else (first if rank == 0 else later)
    return scales


def plain_words(prompt: str, words: dict[str, str]) -> str:
    """``prompt`` with each pseudo-word replaced by its plain word (``words``: token -> word; "" drops it), the
    same word said once where pseudo-words follow each other (``a <tint1> <mystar>`` -> ``a color star``)."""
    from ..metrics.evaluate import plain_prompt

    return plain_prompt(prompt, words)


def copy_roots(ctx: RunContext, most: int = 4) -> list[dict[str, Any]]:
    """Copy (bytes as they are) up to ``most`` images of each root upstream (``root{i}``) into the output;
    one entry per image, naming the assets (as in the step's ``assets``) that descend from it."""
    names = list(getattr(ctx.extra.get("step"), "assets", []))
    out: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for role in sorted((r for r in ctx.upstream if r.startswith("root")), key=lambda r: int(r[4:])):
        up, i = ctx.upstream[role], int(role[4:])
        for img in up.result.get("images", [])[:most]:
            name_i = names[i] if i < len(names) else f"asset{i}"
            if img["digest"] in seen:
                seen[img["digest"]]["assets"].append(name_i)
                continue
            name = f"root-{len(out)}.png"
            shutil.copyfile(up.file(img["file"]), ctx.out_dir / name)
            entry = image_entry(f"root-{len(out)}", name, prompt=img.get("prompt") or "", seed=img.get("seed"),
                                assets=[name_i], digest=img["digest"])
            seen[img["digest"]] = entry
            out.append(entry)
    return out


def set_scales(pipe: Any, scales: list[float]) -> None:
    from ..assets.format import set_lora_scale

    for i, scale in enumerate(scales):
        for _, module in pipe.lora_modules:
            set_lora_scale(module, f"asset{i}", scale)


def resolved_windows(ctx: RunContext, windows: list[Any] | None, assets: list[Any]) -> list[list[float] | None] | None:
    """Each asset's window: as given, or (``auto``) the one its card keeps (``lora_window``)."""
    if not windows:
        return None
    names = list(getattr(ctx.extra.get("step"), "assets", [])) or [f"asset{i}" for i in range(len(assets))]
    out: list[list[float] | None] = []
    for i, window in enumerate(windows):
        if window == "auto":
            kept = (assets[i].card or {}).get("lora_window")
            if not isinstance(kept, dict) or "window" not in kept:
                raise StepFailed(ctx.step_id, f"`lora_windows: {{{names[i]}: auto}}`: the asset's card keeps no "
                                 "lora_window", hint="train it with `train: {lora_window: auto}` (measured) or "
                                 "give the window here as [start, end]")
            window = kept["window"]  # None: measured, and no window helps this asset
        out.append(list(window) if window is not None else None)
    return out


def window_hook(pipe: Any, scales: list[float], windows: list[list[float] | None] | None) -> Any:
    """The sampler's per-step hook for LoRA time windows (None without windows): before each denoiser call at
    ``t/T``, asset ``i``'s denoiser LoRA is set to ``scales[i]`` inside its window and to 0 outside, through
    peft's per-layer scales (no second pass). Scales change only when a window opens or closes."""
    if not windows or not any(windows):
        return None
    from ..assets.format import set_lora_scale

    denoiser = pipe.denoiser
    current: dict[int, float] = {}

    def hook(t_over_T: float) -> None:
        for i, window in enumerate(windows):
            if window is None:
                continue
            want = scales[i] if window[0] <= t_over_T <= window[1] else 0.0
            if current.get(i) != want:
                set_lora_scale(denoiser, f"asset{i}", want)
                current[i] = want

    return hook


def _check_base(ctx: RunContext, i: int, asset: Any) -> None:
    """Refuse an asset trained on another model family or other *weights*; its training dtype does not matter."""
    from ..assets.format import check_family
    from ..models.load import identity_differences

    names = list(getattr(ctx.extra.get("step"), "assets", []))
    shown = names[i] if i < len(names) else f"asset {i}"
    try:
        check_family(asset, ctx.extra.get("model_family") or asset.family, f"this step's model `{ctx.model.base}`")
    except ValueError as exc:
        raise StepFailed(ctx.step_id, f"asset `{shown}` ({asset.path}): {exc}",
                         hint="compose assets with the base model they were trained on") from None
    trained_on = (asset.card.get("base_model") or {})
    theirs, ours = trained_on.get("identity"), ctx.extra.get("model_identity")
    if theirs is None or ours is None:
        return
    diff = identity_differences(theirs, ours)
    if diff:
        raise StepFailed(ctx.step_id, f"asset `{shown}` ({asset.path}) was trained on base model "
                         f"`{trained_on.get('base', '?')}`, but this step runs `{ctx.model.base}`, whose weights "
                         f"differ ({'; '.join(diff)}: the asset's vs this step's)",
                         hint="compose an asset with the base model it was trained on (its dtype and device "
                              "may differ), or train it again on this one")


def _check_prompts(ctx: RunContext, pipe: Any, assets: list[Any]) -> None:
    """Every prompt fits the text encoder: a cut-off pseudo-word would lose its embedding but keep its LoRA."""
    from .prompt_checks import check_prompts, negative_field

    p = ctx.params
    check_prompts(ctx, pipe, "compose", [*((("prompts", j), t) for j, t in enumerate(p["prompts"])),
                                         *negative_field(p)],
                  pseudo_words=[t for a in assets for t in a.tokens])


def _contact_sheet(out_dir: Path, entries: list[dict[str, Any]], baseline: list[dict[str, Any]] | None = None,
                   roots: list[dict[str, Any]] | None = None) -> None:
    """``index.html``: the roots the assets came from, then per prompt a row of its images and, with a
    baseline, the row of their plain-prompt twins above it, column for column (same seed)."""
    twin = {b["id"]: b for b in baseline or []}
    parts = []
    if roots:
        parts.append("<h2>made from: the root</h2>" + _row("root", [{**r, "caption": r["prompt"] or "an image file"}
                                                                  for r in roots], caption="caption"))
    prompts: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        prompts.setdefault(e["prompt_index"], []).append(e)
    for images in prompts.values():
        parts.append(f"<h2>{html.escape(images[0]['prompt'])}</h2>")
        plain = [twin[e["baseline"]] for e in images if e.get("baseline") in twin]
        if len(plain) == len(images):
            parts.append(_row(f"plain prompt: {plain[0]['prompt']} (no asset)", plain))
            parts.append(_row(f"with the asset: {images[0]['prompt']}", images))
        else:
            parts.append(_row(images[0]["prompt"], images))
    note = ("<p>Each column is one seed: the plain prompt without the asset, then the concept. "
            "The gain is what the concept keeps of the root.</p>" if baseline else "")
    (out_dir / "index.html").write_text("<!doctype html><meta charset=utf-8><title>compose</title>"
                                        "<body style='font-family:sans-serif'>" + note + "".join(parts) + "</body>",
                                        encoding="utf-8")


def _row(label: str, images: list[dict[str, Any]], caption: str = "seed") -> str:
    cells = "".join(f'<figure style="margin:4px;width:140px"><img src="{html.escape(e["file"])}" alt="{html.escape(e["id"])}" '
                    'style="width:128px;image-rendering:pixelated"><figcaption style="overflow-wrap:anywhere"><small>'
                    f'{html.escape(_caption(e, caption))}</small></figcaption></figure>' for e in images)
    return (f"<div><div><b>{html.escape(label)}</b></div>"
            f"<div style='display:flex;flex-wrap:wrap'>{cells}</div></div>")


def _caption(entry: dict[str, Any], field: str) -> str:
    return f"seed {entry['seed']}" if field == "seed" else str(entry.get(field, ""))


def asset_folder(ctx: RunContext, role: str, tmp: Path) -> Path:
    """An input asset as a folder: a path input as is, a `concepts` step's record copied out of the store."""
    if role not in ctx.upstream:
        return ctx.inputs[f"{role}/card.yaml"].parent
    folder = tmp / role
    folder.mkdir()
    for name in ASSET_FILES:
        shutil.copyfile(ctx.upstream[role].file(name), folder / name)
    return folder
