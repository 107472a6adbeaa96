"""`caspec assets catalog`: a browsable, offline catalog of a library of concept assets.

Writes ``OUT/catalog.json`` (one entry per asset: name, pseudo-words, base model, previews, eval metrics,
provenance and how to use it) and ``OUT/index.html``, a single page with no script, font or image from
anywhere but ``OUT`` (previews are copied under ``OUT/previews/<asset>/``), so it opens from disk or an
artifact store. Eval metrics come from the spec's finished ``eval`` steps (``--spec``), per asset.
"""
from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from .format import adapter_name_for


def entry_for(info: Any, metrics: dict[str, Any] | None, out: Path) -> dict[str, Any]:
    """The catalog entry of one asset (an ``inspect.AssetInfo``); copies its previews under ``out``."""
    card = info.card
    previews = []
    src = info.folder / "previews"
    if src.is_dir():
        dest = out / "previews" / adapter_name_for(info.name)
        for png in sorted(src.glob("*.png")):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dest / png.name)
            previews.append((dest / png.name).relative_to(out).as_posix())
    base = card.get("base_model") or {}
    words = [{"token": w.get("token"), "role": w.get("role"), "init": w.get("init")}
             for w in card.get("pseudo_words", [])]
    training = card.get("training") or {}
    return {
        "name": info.name, "pseudo_words": words, "captions": card.get("captions", []),
        "base_model": base.get("base"), "base_model_kind": (base.get("identity") or {}).get("kind"),
        "previews": previews, "metrics": metrics,
        "provenance": {"key": info.key or card.get("key"), "seed": card.get("seed"),
                       "training_images": (card.get("training_images") or {}).get("step_key"),
                       "steps": (card.get("result") or {}).get("steps"),
                       "final_loss": (card.get("result") or {}).get("final_loss"),
                       "libraries": card.get("libraries"), "training": {k: training[k] for k in sorted(training)
                                                                        if not isinstance(training[k], (dict, list))}},
        "usage": usage(info.name, [w["token"] for w in words], base.get("base")),
    }


def usage(name: str, tokens: list[str], base: str | None) -> dict[str, str]:
    """Snippets that use the asset: in diffusers, and in A1111 / ComfyUI (after ``caspec export``).

    They run as written and carry nothing but code of their own: every value they embed is quoted as a
    Python string literal (the asset's name in the comments too), pseudo-words must follow the one grammar
    (:data:`caspec.spec.models.TOKEN`, else ``ValueError``), and an embedded model is named by the folder
    caspec built for it (``from_pretrained("toy")`` would look for a hub repository)."""
    from ..spec.models import TOKEN, is_pseudo_word

    bad = [t for t in tokens if not is_pseudo_word(t)]
    if bad:
        raise ValueError(f"asset {name!r}: pseudo-word {bad[0]!r} does not follow the grammar {TOKEN}; "
                         "its card was edited or not written by caspec")
    adapter = adapter_name_for(name)
    plain = " ".join(t.strip("<>") for t in tokens)
    folder = f"{adapter}-diffusers"
    diffusers = "\n".join([
        f"# caspec export {json.dumps(name)} --format diffusers --out {folder}",
        "from pathlib import Path",
        "from diffusers import StableDiffusionPipeline",
        f"pipe = StableDiffusionPipeline.from_pretrained({_model_literal(base)})",
        f"pipe.load_lora_weights({folder!r}, adapter_name={adapter!r})",
        f"pipe.load_textual_inversion([str(p) for p in sorted(Path({folder!r}).glob('*.safetensors'))",
        "                             if p.name != 'pytorch_lora_weights.safetensors'])",
        f"pipe.set_adapters([{adapter!r}], adapter_weights=[0.8])",
        f"image = pipe({'a photo of ' + ' '.join(tokens)!r}).images[0]",
    ])
    a1111 = "\n".join([
        f"# caspec export {json.dumps(name)} --format a1111 --out {adapter}-a1111",
        "# copy the word files to embeddings/ and the LoRA to models/Lora/, then prompt:",
        f"a photo of {plain} <lora:{adapter}:0.8>",
    ])
    return {"diffusers": diffusers, "a1111": a1111}


def _model_literal(base: str | None) -> str:
    """The base model as a Python string literal: an embedded model's built folder, else the name as given."""
    if not base:
        return repr("BASE_MODEL")
    from ..models.load import EMBEDDED, embedded_folder

    return repr(str(embedded_folder(base))) if base in EMBEDDED else repr(str(base))


def spec_metrics(loaded: Any, store: Any) -> dict[str, dict[str, Any]]:
    """Asset name -> the metrics of the spec's finished eval steps (``<eval step>.<metric>``)."""
    from ..plan.graph import make_plan

    out: dict[str, dict[str, Any]] = {}
    for node in make_plan(loaded, store).order():
        record = store.get(node.key) if node.kind == "eval" else None
        for group, values in ((record.result.get("metrics") or {}) if record else {}).items():
            for metric, value in (values or {}).items():
                if isinstance(value, (int, float)):
                    out.setdefault(group, {})[f"{node.id}.{metric}"] = value
    return out


def folder_assets(folder: Path) -> list[Any]:
    """The assets in ``folder``: itself, if it holds a ``card.yaml``, else each sub-folder that does."""
    from ..errors import UsageError
    from .inspect import find_asset

    if (folder / "card.yaml").is_file():
        return [find_asset(str(folder), None, None)]
    found = [find_asset(str(d), None, None) for d in sorted(folder.iterdir()) if (d / "card.yaml").is_file()]
    if not found:
        raise UsageError(f"`{folder}` holds no concept asset (no card.yaml in it or its sub-folders)",
                         hint="point at a folder of exported or laid-out assets, or use --spec SPEC")
    return found


def write_catalog(entries: list[dict[str, Any]], out: Path, *, title: str) -> tuple[Path, Path]:
    from ..fsutil import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    data = {"catalog_version": 1, "title": title, "assets": entries}
    json_path = atomic_write_text(out / "catalog.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    html_path = atomic_write_text(out / "index.html", render_html(data))
    return json_path, html_path


def _metrics_html(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return '<p class="muted">no eval metrics</p>'
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:.3f}</td></tr>" if isinstance(v, (int, float))
                   else f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in sorted(metrics.items()))
    return f'<table class="metrics">{rows}</table>'


def _card_html(e: dict[str, Any]) -> str:
    esc = html.escape
    words = "".join(f'<li><code>{esc(str(w["token"]))}</code> {esc(str(w["role"]))}, from <em>{esc(str(w["init"]))}</em></li>'
                    for w in e["pseudo_words"])
    previews = "".join(f'<img src="{esc(p)}" alt="{esc(e["name"])} preview" loading="lazy">' for p in e["previews"])
    prov = e["provenance"]
    return f"""
<article class="asset" data-testid="asset-{esc(e['name'])}" id="{esc(e['name'])}">
  <h2>{esc(e['name'])}</h2>
  <p class="base">base model <code>{esc(str(e['base_model']))}</code></p>
  <div class="previews">{previews or '<p class="muted">no previews</p>'}</div>
  <h3>Pseudo-words</h3><ul class="words">{words}</ul>
  <h3>Eval</h3>{_metrics_html(e['metrics'])}
  <h3>Use it</h3>
  <details open><summary>diffusers</summary><pre data-testid="diffusers-{esc(e['name'])}">{esc(e['usage']['diffusers'])}</pre></details>
  <details><summary>A1111 / ComfyUI</summary><pre>{esc(e['usage']['a1111'])}</pre></details>
  <h3>Provenance</h3>
  <p class="prov">key <code>{esc(str(prov['key'])[:12])}</code>, seed {esc(str(prov['seed']))},
  {esc(str(prov['steps']))} steps, final loss {esc(f"{prov['final_loss']:.4f}" if isinstance(prov['final_loss'], float) else str(prov['final_loss']))},
  training images <code>{esc(str(prov['training_images'])[:12])}</code></p>
</article>"""


def render_html(data: dict[str, Any]) -> str:
    cards = "".join(_card_html(e) for e in data["assets"])
    title = html.escape(data["title"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self'; style-src 'unsafe-inline'">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem; color: #222; background: #fafafa; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1.2rem; }}
.asset {{ background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 1rem; }}
.previews img {{ width: 96px; height: 96px; object-fit: cover; margin: 2px; image-rendering: pixelated; }}
pre {{ background: #f3f3f3; padding: .6rem; overflow-x: auto; font-size: 12px; }}
.muted {{ color: #888; }} h2 {{ margin: 0 0 .3rem; }} h3 {{ font-size: 14px; margin: .8rem 0 .2rem; }}
table.metrics td {{ padding: 0 .8rem 0 0; }}
</style></head>
<body><h1>{title}</h1><p data-testid="count">{len(data['assets'])} concept asset(s)</p>
<div class="grid">{cards}</div></body></html>
"""


__all__ = ["entry_for", "usage", "spec_metrics", "folder_assets", "write_catalog", "render_html"]
