"""Issue 6's concept-extraction experiment (``specs/toy-concepts.yaml``), measured with the attribute reader.

Two roots carry an exact attribute that coarse words cannot name (:data:`SPOT`: a position; :data:`HUE`: a
hue).  The spec trains concept assets from SDEdit variations of each, three ways (textual inversion only,
LoRA only, caspec's two-phase method), composes the constant pseudo-word with new words, and generates
plain-text baselines.  :func:`measure` reads every output image and reports, per method, the error of
the exact attribute against the root (mean, standard deviation, median) and how often the new word was
followed, plus the paper's CLIP metrics (prompt and identity consistency) with the toy CLIP.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .data import OUTLINE_PX
from .reader import read
from .render import Obj, Scene, render

BACKGROUND = (0.0, 0.0, 0.5)
SPOT = Obj("square", hue=0.07, sat=0.9, val=0.95, size=0.45, x=0.30, y=0.62, rotation=0.0, outline=OUTLINE_PX)
HUE = Obj("circle", hue=0.70, sat=0.9, val=0.95, size=0.45, x=0.5, y=0.5, rotation=0.0, outline=OUTLINE_PX)
# issue 17's three-asset prompt (specs/toy-claims.yaml): a large green square of exactly size 0.56 ("large"
# spans 0.4-0.6 in the toy's training scenes), in the centre
SIZE = Obj("square", hue=0.35, sat=0.9, val=0.95, size=0.56, x=0.5, y=0.5, rotation=0.0, outline=OUTLINE_PX)
ROOTS = {"spot": SPOT, "hue": HUE, "size": SIZE}
METHODS = ("plain", "ti", "lora", "both")
METHOD_NAMES = {"plain": "(a) plain prompt", "ti": "(b) textual inversion only", "lora": "(c) LoRA only",
                "both": "(d) caspec two-phase"}
# issue 17, part 4 (specs/toy-position.yaml): the same methods with training options beyond the paper
OPTION_METHODS = ("cubic", "conv", "cubicconv", "loracc", "cclong", "ticubic", "cc600", "cco", "ccolong")
METHOD_NAMES.update({"cubic": "(d) two-phase + cubic timesteps", "conv": "(d) two-phase + conv LoRA",
                     "cubicconv": "(d) two-phase + cubic + conv", "loracc": "(c) LoRA only + cubic + conv",
                     "cclong": "(d) two-phase + cubic + conv, 400 + 800 steps",
                     "ticubic": "(b) textual inversion only + cubic",
                     "cc600": "(d) two-phase + cubic + conv, 400 + 600 steps",
                     "cco": "(d) two-phase + cubic, LoRA on the convolutions only",
                     "ccolong": "(d) two-phase + cubic, LoRA on the convolutions only, 400 + 800 steps"})
NEW_COLORS = ("red", "cyan", "yellow")
NEW_SHAPES = ("triangle", "ring")
DESCRIBE = {"spot": "square", "hue": "blue"}
# an output "has" the exact attribute when its error is within this (position: issue 6's 0.1 of the width)
WITHIN = {"spot": 0.1, "hue": 0.02}


def root_image(concept: str):
    """The root PNG of ``concept`` (32x32), rendered exactly."""
    return render(Scene((ROOTS[concept],), background=BACKGROUND, size=32))


def write_roots(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ROOTS:
        path = folder / f"{name}.png"
        root_image(name).save(path)
        paths.append(path)
    return paths


def hue_distance(a: float, b: float) -> float:
    """Circular distance between two hues in [0, 1), in [0, 0.5]."""
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def _groups(loaded: Any, store: Any) -> dict[tuple[str, str], list[tuple[Any, str, int | None]]]:
    """(concept, method) -> [(image, prompt, seed)] from the run's records and output folders."""
    from PIL import Image

    from ..exec.runner import out_dir_for
    from ..plan.graph import make_plan

    plan = make_plan(loaded, store)
    groups: dict[tuple[str, str], list[tuple[Any, str]]] = {}
    for sid, node in plan.nodes.items():
        if sid.startswith("plain-"):
            concept, method = sid.split("-")[1], "plain"
        elif sid.startswith("make-"):
            _, concept, method = sid.split("-")
        else:
            continue
        record = store.get(node.key)
        if record is None:
            raise RuntimeError(f"step `{sid}` has not run: run `caspec run {loaded.path}` first")
        folder = out_dir_for(loaded, sid)
        for entry in record.result["images"]:
            with Image.open(folder / entry["file"]) as im:
                groups.setdefault((concept, method), []).append((im.convert("RGB"), entry["prompt"], entry.get("seed")))
    return groups


def error_stats(values: list[float], within: float) -> dict[str, Any] | None:
    """Mean, spread, median, count and the share within ``within`` of a list of errors (None when empty)."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size),
            "within": float((a <= within).mean()), "tolerance": within}


def attribute_error(concept: str, r: Any) -> float:
    """The exact attribute's error of reading ``r`` against the concept's root: place or hue."""
    root = ROOTS[concept]
    return math.hypot(r.x - root.x, r.y - root.y) if concept == "spot" else hue_distance(r.hue, root.hue)


# issue 17, part 4: (concept, a, b) compared seed by seed (BENCHMARKS.md#position)
PAIRS = (("spot", "both", "lora"), ("spot", "cubicconv", "loracc"), ("spot", "cco", "loracc"),
         ("spot", "cc600", "loracc"), ("spot", "cclong", "loracc"), ("spot", "ccolong", "loracc"),
         ("hue", "cubic", "ti"), ("hue", "cubicconv", "ti"), ("hue", "cc600", "ti"), ("hue", "cco", "ti"),
         ("hue", "cclong", "ti"), ("hue", "ccolong", "ti"))


def paired(loaded: Any, store: Any, pairs: tuple[tuple[str, str, str], ...] = PAIRS) -> dict[str, list[dict[str, Any]]]:
    """Seed-by-seed differences of the error, method ``a`` minus method ``b``, for each pair the spec has.

    With ``compose: same_seeds: true`` and the same prompts in the same order, image i of one method and
    image i of another share their noise, so the difference is paired: its mean, the standard error of that
    mean, and on how many seeds each method is better (``rows``). Images unreadable in either method are
    left out. Pairs whose images were drawn from other seeds cannot be paired: they go to ``skipped``,
    with the reason."""
    groups = _groups(loaded, store)
    rows, skipped = [], []
    for concept, a, b in pairs:
        if (concept, a) not in groups or (concept, b) not in groups:
            continue
        ia, ib = groups[(concept, a)], groups[(concept, b)]
        if [seed for _, _, seed in ia] != [seed for _, _, seed in ib]:
            skipped.append({"concept": concept, "a": a, "b": b,
                            "why": "drawn from other seeds (compose them with `same_seeds: true`)"})
            continue
        diffs = []
        for (img_a, _, _), (img_b, _, _) in zip(ia, ib):
            try:
                diffs.append(attribute_error(concept, read(img_a)) - attribute_error(concept, read(img_b)))
            except ValueError:
                continue
        d = np.asarray(diffs, dtype=np.float64)
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
        rows.append({"concept": concept, "a": a, "b": b, "n": int(d.size), "mean_difference": float(d.mean()),
                     "paired_se": se, "a_better": int((d < 0).sum()), "b_better": int((d > 0).sum())})
    return {"rows": rows, "skipped": skipped}


def measure(loaded: Any, store: Any, clip: Any | None = None) -> dict[str, Any]:
    """Reader-based errors (and CLIP metrics when ``clip`` is given) per concept and method."""
    from ..metrics.evaluate import identity_consistency, prompt_consistency

    out: dict[str, Any] = {}
    for (concept, method), items in sorted(_groups(loaded, store).items()):
        errors, followed, unread = [], [], 0
        for img, prompt, _ in items:
            try:
                r = read(img)
            except ValueError:
                unread += 1
                continue
            errors.append(attribute_error(concept, r))
            if concept == "spot":
                want = next(c for c in NEW_COLORS if f" {c} " in f" {prompt} ")
                followed.append(r.color_name == want)
            else:
                want = next(s for s in NEW_SHAPES if prompt.rstrip().endswith(s))
                followed.append(r.shape == want)
        row: dict[str, Any] = {
            "method": METHOD_NAMES[method],
            "error": error_stats(errors, WITHIN[concept]),
            "error_unit": "distance / image width" if concept == "spot" else "hue distance (1 = full circle)",
            "new_word_followed": float(np.mean(followed)) if followed else 0.0,
            "unreadable": unread,
            "images": len(items),
        }
        if clip is not None:
            import re

            describe = DESCRIBE[concept]
            texts = [re.sub(r"<[^>]+>", describe, p) if method != "plain" else p for _, p, _ in items]
            imgs = [im for im, _, _ in items]
            row["prompt_consistency"] = float(np.mean(prompt_consistency(clip, imgs, texts)))
            row["identity_consistency"] = identity_consistency(clip, imgs)
        out.setdefault(concept, {})[method] = row
    return out


def plot(result: dict[str, Any], path: Path) -> Path:
    """Fig.-5-style scatter (prompt vs identity consistency) per concept, and the reader's errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    markers = {"plain": "s", "ti": "^", "lora": "v", "both": "o"}
    for concept, ax in zip(("spot", "hue"), axes[:2]):
        rows = result.get(concept, {})
        for method, row in rows.items():
            if "prompt_consistency" in row:
                ax.scatter(row["prompt_consistency"], row["identity_consistency"], marker=markers.get(method, "D"), s=70,
                           label=METHOD_NAMES[method])
        ax.set_xlabel("prompt consistency (toy CLIP text-image)")
        ax.set_ylabel("identity consistency (toy CLIP image-image)")
        ax.set_title(f"{concept} concept")
        ax.legend(fontsize=7)
    ax = axes[2]
    width = 0.38
    for i, concept in enumerate(("spot", "hue")):
        rows = result.get(concept, {})
        means = [rows[m]["error"]["mean"] if m in rows and rows[m]["error"] else np.nan for m in METHODS]
        stds = [rows[m]["error"]["std"] if m in rows and rows[m]["error"] else 0 for m in METHODS]
        ax.bar(np.arange(len(METHODS)) + (i - 0.5) * width, means, width, yerr=stds, capsize=3,
               label="spot: position error" if concept == "spot" else "hue: hue error")
    ax.set_xticks(np.arange(len(METHODS)), ["plain", "TI", "LoRA", "two-phase"])
    ax.set_ylabel("error vs root (reader), mean ± sd")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["SPOT", "HUE", "SIZE", "ROOTS", "METHODS", "OPTION_METHODS", "METHOD_NAMES", "root_image", "write_roots", "hue_distance", "error_stats", "attribute_error", "measure", "paired", "PAIRS", "plot"]
