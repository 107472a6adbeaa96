"""Issue 17, parts 1 and 2: the paper's claims beyond one constant word, measured with the exact reader.

``specs/toy-claims.yaml`` trains the ``spot`` concept (constant: an orange square's exact place
(0.30, 0.62); varied: each SDEdit image's colour) and the ``hue`` concept (constant: hue 0.700) with
caspec's two-phase method, then composes. :func:`measure` reads every image and reports:

* part 1, one training, disentangled words:
  - ``a1_new``: ``<spot>`` with new colour words: position error against the root's place, and whether
    the colour word is followed;
  - ``a1_bk``: ``<spot> <spot-ck>`` for every training image k: position error against the root and hue
    error against image k's own hue (read from image k);
  - ``bk_right``: ``<spot-ck>`` alone with a new position word ("... square at the right"): hue error
    against image k and whether the object is at the right (x > 2/3);
  each against the best plain prompt (the colour word of image k, and the position word);
* part 2, assets from different trainings in one prompt (``a <hue> <spot>``), per LoRA scale rule: how
  often the object is within 0.1 of the exact place *and* within 0.02 of the exact hue.

Every figure is read from pixels by :func:`caspec.toyworld.reader.read`.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .experiment import HUE, SPOT, hue_distance
from .reader import read

PLACE_WITHIN = 0.1
HUE_WITHIN = 0.02
COLOR_WORDS = ("blue", "green", "purple", "pink", "red", "cyan", "yellow", "orange")
MIXES = {  # compose step -> how its scales were set (hue asset, spot asset)
    "mix-paper": "0.8 / 0.5: the paper's rule (<hue> first)",
    "mix-paper-swapped": "0.5 / 0.8 (fixed)",
    "mix-full": "1.0 / 1.0",
    "mix-equal": "0.8 / 0.8",
    "mix-hue-lora-only": "0.8 / 0 (only the hue asset's LoRA)",
    "mix-spot-lora-only": "0 / 0.8 (only the spot asset's LoRA)",
    "mix-spot-first": "spot 0.8 / hue 0.5: the paper's rule, other prompt order (\"a <spot> in <hue>\")",
    "plain-mix": "plain prompt \"a blue square at the left\"",
}


def step_images(loaded: Any, store: Any, step_id: str) -> list[tuple[Any, dict[str, Any]]]:
    """``(image, result entry)`` for every image of a step that has run, in result order."""
    from PIL import Image

    plan = _plan(loaded, store)
    record = store.get(plan.nodes[step_id].key)
    if record is None:
        raise RuntimeError(f"step `{step_id}` has not run: run `caspec run {loaded.path}` first")
    out = []
    for entry in record.result.get("images") or []:
        with Image.open(record.file(entry["file"])) as im:
            out.append((im.convert("RGB"), entry))
    return out


_PLANS: dict[int, Any] = {}


def _plan(loaded: Any, store: Any) -> Any:
    from ..plan.graph import make_plan

    key = id(loaded)
    if key not in _PLANS:
        _PLANS[key] = make_plan(loaded, store)
    return _PLANS[key]


def _reads(images: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for img, entry in images:
        try:
            out.append((read(img), entry))
        except ValueError:  # nothing readable drawn: counts as a miss where a share is reported
            out.append((None, entry))
    return out


def _stats(values: list[float], within: float) -> dict[str, Any] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)), "n": int(a.size),
            "within": float((a <= within).mean()), "tolerance": within}


def _place_error(r: Any) -> float:
    return math.hypot(r.x - SPOT.x, r.y - SPOT.y)


def _word(prompt: str, words: tuple[str, ...]) -> str | None:
    found = [w for w in words if re.search(rf"\b{w}\b", prompt or "")]
    return found[0] if found else None


def training_images(loaded: Any, store: Any) -> list[dict[str, Any]]:
    """Image k of the spot concept (k = 1..N, in training order): its reading and its edit's colour word."""
    out = []
    for k, (r, entry) in enumerate(_reads(step_images(loaded, store, "spot-picks")), 1):
        if r is None:
            raise RuntimeError(f"training image {k} of the spot concept is unreadable")
        out.append({"k": k, "hue": r.hue, "x": r.x, "y": r.y, "color": _word(entry.get("prompt", ""), COLOR_WORDS)
                    or r.color_name})
    return out


def _k_of(prompt: str) -> int:
    m = re.search(r"<spot-c(\d+)>", prompt)
    if m is None:
        raise ValueError(f"no <spot-ck> in {prompt!r}")
    return int(m.group(1))


def part1(loaded: Any, store: Any) -> dict[str, Any]:
    train = {t["k"]: t for t in training_images(loaded, store)}
    out: dict[str, Any] = {"training_images": list(train.values())}

    # <A1> with new colour words vs "a <colour> square at the left"
    def new_colors(rows):
        place, followed = [], []
        for r, entry in rows:
            want = _word(entry.get("prompt", ""), COLOR_WORDS)
            followed.append(r is not None and r.color_name == want)
            if r is not None:
                place.append(_place_error(r))
        return {"position_error": _stats(place, PLACE_WITHIN), "color_followed": float(np.mean(followed)),
                "images": len(rows)}

    plain = [x for c in ("red", "cyan", "yellow") for x in _reads(step_images(loaded, store, f"plain-new-{c}"))]
    out["a1_new"] = {"two-phase": new_colors(_reads(step_images(loaded, store, "a1-new"))),
                     "plain": new_colors(plain)}

    # <A1> <Bk>: place of the root, hue of image k; plain: "a <colour of k> square at the left"
    def place_and_hue(rows, k_of):
        place, hue = [], []
        for r, entry in rows:
            if r is None:
                continue
            place.append(_place_error(r))
            hue.append(hue_distance(r.hue, train[k_of(entry)]["hue"]))
        return {"position_error": _stats(place, PLACE_WITHIN), "hue_error": _stats(hue, HUE_WITHIN),
                "images": len(rows)}

    mine = _reads(step_images(loaded, store, "a1-bk"))
    plain_rows, plain_k = _plain_per_k(loaded, store, train, "left")
    out["a1_bk"] = {"two-phase": place_and_hue(mine, lambda e: _k_of(e["prompt"])),
                    "plain": place_and_hue(plain_rows, lambda e: plain_k[id(e)])}

    # <Bk> alone with a new position word: hue of image k; is the object at the right?
    def hue_and_right(rows, k_of):
        hue, right = [], []
        for r, entry in rows:
            right.append(r is not None and r.x > 2 / 3)
            if r is not None:
                hue.append(hue_distance(r.hue, train[k_of(entry)]["hue"]))
        return {"hue_error": _stats(hue, HUE_WITHIN), "position_followed": float(np.mean(right)),
                "images": len(rows)}

    mine = _reads(step_images(loaded, store, "bk-right"))
    plain_rows, plain_k = _plain_per_k(loaded, store, train, "right")
    out["bk_right"] = {"two-phase": hue_and_right(mine, lambda e: _k_of(e["prompt"])),
                       "plain": hue_and_right(plain_rows, lambda e: plain_k[id(e)])}
    return out


def _plain_per_k(loaded: Any, store: Any, train: dict[int, dict[str, Any]], where: str):
    """The plain baseline of each image k: "a <colour of k> square at the <where>" (shared by the images of
    one colour; each compared with image k's own hue)."""
    rows, k_of = [], {}
    for k, t in train.items():
        for r, entry in _reads(step_images(loaded, store, f"plain-{where}-{t['color']}")):
            entry = dict(entry)
            rows.append((r, entry))
            k_of[id(entry)] = k
    return rows, k_of


def part2(loaded: Any, store: Any) -> dict[str, Any]:
    out = {}
    for sid, rule in MIXES.items():
        rows = _reads(step_images(loaded, store, sid))
        place = [_place_error(r) if r is not None else math.inf for r, _ in rows]
        hue = [hue_distance(r.hue, HUE.hue) if r is not None else math.inf for r, _ in rows]
        both = [p <= PLACE_WITHIN and h <= HUE_WITHIN for p, h in zip(place, hue)]
        out[sid] = {"rule": rule, "images": len(rows), "place_and_hue": float(np.mean(both)),
                    "place_within": float(np.mean([p <= PLACE_WITHIN for p in place])),
                    "hue_within": float(np.mean([h <= HUE_WITHIN for h in hue])),
                    "place_error": _stats([p for p in place if math.isfinite(p)], PLACE_WITHIN),
                    "hue_error": _stats([h for h in hue if math.isfinite(h)], HUE_WITHIN),
                    "square": float(np.mean([r is not None and r.shape == "square" for r, _ in rows]))}
    return out


def measure(loaded: Any, store: Any) -> dict[str, Any]:
    """Parts 1 and 2 of issue 17 (see the module docstring)."""
    _PLANS.pop(id(loaded), None)
    return {"part1": part1(loaded, store), "part2": part2(loaded, store)}


__all__ = ["measure", "part1", "part2", "step_images", "training_images", "MIXES", "PLACE_WITHIN", "HUE_WITHIN"]
