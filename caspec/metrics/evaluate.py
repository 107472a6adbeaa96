"""The paper's two CLIP metrics (section 4.1) and its Fig. 5 plot.

* prompt consistency: the cosine between an image and the prompt it was generated from, with the
  pseudo-words replaced by plain words (``<robot3>`` -> ``robot``), so a stock CLIP can read it;
* identity consistency: the mean cosine between the images of one concept (all pairs i < j);
* both again for a concept's *baseline* (the same seeds drawn from the plain prompt, no asset), scored
  against the same plain text, so the concept's gain over the plain prompt can be read.

:func:`evaluate` scores groups of (image, prompt) pairs (a group is a concept, or a method to compare)
into a JSON-serialisable result, :func:`plot` draws it as Fig. 5 (prompt consistency on x, identity
consistency on y), and :func:`check_thresholds` says which group falls below a bar.
"""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..fsutil import atomic_write_bytes, atomic_write_text
from .clip import Clip, weights_info

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

METRICS = ("prompt_consistency", "identity_consistency")
_WORD = re.compile(r"<[^<>\s]+>")  # a pseudo-word, as the spec loader finds them


# ---------------------------------------------------------------------------------------------
# the metrics


def _pairwise_mean(emb: "torch.Tensor") -> float | None:
    """Mean cosine over all pairs i < j of unit vectors ``emb`` (None for fewer than two)."""
    import torch

    n = int(emb.shape[0])
    if n < 2:
        return None
    sims = emb.double() @ emb.double().T
    iu = torch.triu_indices(n, n, offset=1)
    return float(sims[iu[0], iu[1]].mean())


def prompt_consistency(clip: Clip, images: Sequence["Image.Image"], prompts: Sequence[str]) -> list[float]:
    """Cosine of each image with its own prompt (prompts used as given: see :func:`plain_prompt`)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: each image needs its prompt")
    if not images:
        return []
    img = clip.embed_images(list(images))
    txt = _embed_unique(clip, list(prompts))
    return [float(v) for v in (img.double() * txt.double()).sum(dim=1)]


def identity_consistency(clip: Clip, images: Sequence["Image.Image"]) -> float | None:
    """Mean pairwise cosine among ``images`` (i < j); None when there are fewer than two."""
    if len(images) < 2:
        return None
    return _pairwise_mean(clip.embed_images(list(images)))


def _embed_unique(clip: Clip, texts: list[str]) -> "torch.Tensor":
    """Embeddings of ``texts`` in order, each distinct text embedded once."""
    unique = list(dict.fromkeys(texts))
    emb = clip.embed_texts(unique)
    index = {t: i for i, t in enumerate(unique)}
    return emb[[index[t] for t in texts]]


# ---------------------------------------------------------------------------------------------
# pseudo-words -> plain words


def _matchers(describe: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    """Exact words first, then ``{k}`` templates (``{k}`` = digits, as in the spec), in the given order."""
    exact = [(re.compile(re.escape(k) + r"\Z"), v) for k, v in describe.items() if "{k}" not in k]
    templates = [(re.compile(re.escape(k).replace(re.escape("{k}"), r"[0-9]+") + r"\Z"), v)
                 for k, v in describe.items() if "{k}" in k]
    return exact + templates


def plain_prompt(prompt: str, describe: Mapping[str, str]) -> str:
    """``prompt`` with every pseudo-word replaced by the user's plain words.

    ``describe`` maps a pseudo-word (``<dance1>``) or a template (``<robot{k}>``, any number for ``{k}``)
    to a description (``"robot"``). Adjacent pseudo-words with the same description give it once
    (``<robot1> <robot2>`` -> ``robot``), and whitespace is tidied. A pseudo-word that ``describe`` does
    not cover raises ValueError naming it.
    """
    matchers = _matchers(describe or {})
    missing: list[str] = []
    out: list[str] = []
    pos = 0
    last: str | None = None  # description of the previous pseudo-word, if only whitespace follows it
    for m in _WORD.finditer(prompt):
        word = m.group(0)
        probe = word.replace("{k}", "1")  # a template in the prompt itself stands for its instances
        desc = next((d for rx, d in matchers if rx.match(word) or rx.match(probe)), None)
        gap = prompt[pos:m.start()]
        if desc is None:
            missing.append(word)
            out += [gap, word]
            last = None
        elif last is not None and desc == last and not gap.strip():
            pass  # the same description again, right after: say it once
        else:
            out += [gap, str(desc)]
            last = desc
        pos = m.end()
    if missing:
        words = ", ".join(f"`{w}`" for w in dict.fromkeys(missing))
        raise ValueError(f"no plain description for pseudo-word(s) {words} in prompt {prompt!r}: "
                         "add them to `describe` (a word, or a template such as `<robot{k}>`)")
    out.append(prompt[pos:])
    return re.sub(r"\s+", " ", "".join(out)).strip()


# ---------------------------------------------------------------------------------------------
# groups, plot, thresholds


def evaluate(clip: Clip, groups: Mapping[str, Sequence[tuple["Image.Image", str]]],
             describe: Mapping[str, str] | None = None, *,
             baselines: Mapping[str, Sequence[tuple["Image.Image", str]]] | None = None) -> dict[str, Any]:
    """Score each group of (image, prompt) pairs: mean prompt consistency, identity consistency, n.

    Returns ``{"groups": {name: {"prompt_consistency", "identity_consistency", "n"}}, "clip": identity}``
    (JSON-serialisable; a metric that cannot be computed, e.g. identity for one image, is None); ``clip``
    says ``random_weights`` and, for random ones, carries a ``warning``.

    ``baselines`` (name -> the plain-prompt twins of a group's images, each with the prompt of the image it
    twins, so both are scored against the same plain text) adds ``"baselines": {name: {...}}``.
    All images are embedded in one batched pass, and each distinct prompt once.
    """
    describe = describe or {}
    sets = {("groups", name): items for name, items in groups.items()}
    sets.update({("baselines", name): items for name, items in (baselines or {}).items()})
    images: list[Any] = []
    prompts: list[str] = []
    spans: dict[tuple[str, str], tuple[int, int]] = {}
    for (kind, name), items in sets.items():
        start = len(images)
        for image, prompt in items:
            try:
                prompts.append(plain_prompt(prompt, describe))
            except ValueError as exc:
                raise ValueError(f"group `{name}`: {exc}") from None
            images.append(image)
        spans[(kind, name)] = (start, len(images))

    if images:
        img = clip.embed_images(images).double()
        txt = _embed_unique(clip, prompts).double()
        per_image = (img * txt).sum(dim=1)
    out: dict[str, Any] = {"groups": {}}
    for (kind, name), (a, b) in spans.items():
        n = b - a
        out.setdefault(kind, {})[name] = {
            "prompt_consistency": float(per_image[a:b].mean()) if n else None,
            "identity_consistency": _pairwise_mean(img[a:b]) if n >= 2 else None,
            "n": n,
        }
    return {**out, "clip": {**clip.identity, **weights_info(clip.spec.model, clip.spec.pretrained)}}


def save_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``result`` as indented JSON (atomically); NaN or infinity is refused, not written."""
    text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(Path(path), text)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot(result: Mapping[str, Any], path: str | Path, *, title: str | None = None,
         strip: Sequence[tuple[str, "Image.Image"]] = ()) -> Path:
    """A PNG scatter as the paper's Fig. 5: prompt consistency (x) vs identity consistency (y), one
    labelled point per group, and (hollow, with an arrow to its concept) the group's plain-prompt baseline.
    Groups missing a metric (fewer than 2 images) are listed, not drawn. ``strip``: (label, image) pairs
    drawn in a row under the plot (root | plain prompt | concept)."""
    fig = figure(result, title=title, strip=strip)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(path), buf.getvalue())


def figure(result: Mapping[str, Any], *, title: str | None = None,
           strip: Sequence[tuple[str, "Image.Image"]] = ()) -> Any:
    """The matplotlib Figure that :func:`plot` saves (no pyplot: no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = result.get("groups", {})
    baselines = result.get("baselines", {})
    drawn = {k: v for k, v in groups.items() if _drawable(v)}
    skipped = [k for k in groups if k not in drawn]

    fig = Figure(figsize=(5.5, 6.4 if strip else 4.5), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if strip else 1, max(len(strip), 1), height_ratios=[3.2, 1] if strip else [1])
    ax = fig.add_subplot(grid[0, :])
    for i, (name, v) in enumerate(drawn.items()):
        x, y = v["prompt_consistency"], v["identity_consistency"]
        ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
        ax.annotate(f"{name} (n={v.get('n', '?')})", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        base = baselines.get(name)
        if base and _drawable(base):
            bx, by = base["prompt_consistency"], base["identity_consistency"]
            ax.scatter([bx], [by], s=60, facecolors="none", edgecolors=f"C{i % 10}", zorder=3)
            ax.annotate("", xy=(x, y), xytext=(bx, by), arrowprops={"arrowstyle": "->", "color": f"C{i % 10}"})
            left = bx >= x  # the label on the side away from the arrow
            ax.annotate(f"{name}: plain prompt", (bx, by), textcoords="offset points", xytext=(-6 if left else 6, -12),
                        ha="right" if left else "left", fontsize=8)
    ax.set_xlabel("prompt consistency (CLIP text-image cosine)")
    ax.set_ylabel("identity consistency (CLIP image-image cosine)")
    clip = result.get("clip") or {}
    heading = plot_title(clip) if title is None else title + (" (RANDOM CLIP weights)" if clip.get("random_weights") else "")
    ax.set_title(heading, fontsize=10, color="#b00" if clip.get("random_weights") else "black")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.margins(0.25)
    else:
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center", transform=ax.transAxes)
    for j, (label, image) in enumerate(strip):
        cell = fig.add_subplot(grid[1, j])
        cell.imshow(image)
        cell.set_axis_off()
        cell.set_title(label if len(label) <= 30 else label[:29] + "…", fontsize=7)
    if skipped:
        fig.text(0.01, 0.01, "not drawn (fewer than 2 images): " + ", ".join(skipped), fontsize=7)
    fig.tight_layout()
    return fig


def _drawable(values: Mapping[str, Any]) -> bool:
    return _finite(values.get("prompt_consistency")) and _finite(values.get("identity_consistency"))


def plot_title(clip: Mapping[str, Any]) -> str:
    """``CLIP <model> / <tag>``, saying so loudly when the weights are random."""
    if clip.get("random_weights"):
        return f"CLIP {clip.get('model', '?')} with RANDOM weights: meaningless scores"
    return f"CLIP {clip.get('model', '?')}" + (f" / {clip['pretrained']}" if clip.get("pretrained") else "")


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def check_thresholds(result: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[str]:
    """One message per group and metric below its threshold, e.g. ``robot: identity_consistency 0.41 < 0.5``.

    A key is a metric name (every group) or ``<group>.<metric>`` (that group; wins over the general one).
    A metric that could not be computed (None) fails its threshold. Unknown metric names raise ValueError.
    """
    groups = result.get("groups", {})
    general: dict[str, float] = {}
    specific: dict[tuple[str, str], float] = {}
    for key, bar in thresholds.items():
        if key in METRICS:
            general[key] = float(bar)
            continue
        group, _, metric = key.rpartition(".")
        if metric not in METRICS or not group:
            raise ValueError(f"threshold `{key}`: not a metric ({', '.join(METRICS)}) nor `<group>.<metric>`")
        if group not in groups:
            raise ValueError(f"threshold `{key}`: no group `{group}` in the result (groups: {', '.join(groups) or 'none'})")
        specific[(group, metric)] = float(bar)

    messages: list[str] = []
    for name, values in groups.items():
        for metric in METRICS:
            bar = specific.get((name, metric), general.get(metric))
            if bar is None:
                continue
            value = values.get(metric)
            if not _finite(value):
                messages.append(f"{name}: {metric} not measured (n={values.get('n', 0)}) < {_fmt(bar)}")
            elif value < bar:
                messages.append(f"{name}: {metric} {_fmt(value)} < {_fmt(bar)}")
    return messages


__all__ = [
    "METRICS", "prompt_consistency", "identity_consistency", "plain_prompt", "evaluate", "save_result",
    "plot", "figure", "plot_title", "check_thresholds",
]
