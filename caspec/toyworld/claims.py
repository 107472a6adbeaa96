"""Issue 17: the paper's claims beyond one constant word, measured with the exact reader.

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
  often the object is within 0.1 of the exact place *and* within 0.02 of the exact hue; then three assets
  (``a <hue> <size> <spot>``, :func:`part2_three`): place, hue, size (within 0.03 of 0.56), square, and all.

Part 3, the ablation (``specs/toy-ablation.yaml``, :func:`ablation`): the spot concept learned from 1, 3,
5, 8 or 16 variations at three step counts, and two baselines on the root alone; each asset with new colour
words: position error, how often the new colour shows (diversity), and the toy CLIP's prompt and identity
consistency.

Every figure is read from pixels by :func:`caspec.toyworld.reader.read` (or computed by the toy CLIP).
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .experiment import HUE, SIZE, attribute_error, error_stats, hue_distance
from .reader import read

PLACE_WITHIN = 0.1
HUE_WITHIN = 0.02
SIZE_WITHIN = 0.03  # of the image width (the reader reads the root's 0.56 as 0.564)
COLOR_WORDS = ("blue", "green", "purple", "pink", "red", "cyan", "yellow", "orange")
MIXES = {  # compose step -> how its scales were set (hue asset, spot asset)
    "mix-paper": "0.8 / 0.5: the paper's rule (<hue> first)",
    "mix-paper-swapped": "0.5 / 0.8 (fixed)",
    "mix-full": "1.0 / 1.0",
    "mix-equal": "0.8 / 0.8",
    "mix-hue-lora-only": "0.8 / 0 (only the hue asset's LoRA)",
    "mix-spot-lora-only": "0 / 0.8 (only the spot asset's LoRA)",
    "mix-spot-first": "spot 0.8 / hue 0.5: the paper's rule, other prompt order (\"a <spot> in <hue>\")",
    "alone-hue": "the hue asset alone, 0.8 (\"a <hue> square at the left\")",
    "alone-spot": "the spot asset alone, 0.8 (\"a blue <spot>\")",
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


def step_ids(loaded: Any, store: Any) -> set[str]:
    """The ids of the spec's steps."""
    return set(_plan(loaded, store).nodes)


_PLANS: dict[int, Any] = {}


def _plan(loaded: Any, store: Any) -> Any:
    from ..plan.graph import make_plan

    key = id(loaded)
    if key not in _PLANS:
        _PLANS[key] = make_plan(loaded, store)
    return _PLANS[key]


def reads(images: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    """``(reading or None, entry)`` per image: the exact reader's attributes (None: nothing readable drawn)."""
    out = []
    for img, entry in images:
        try:
            out.append((read(img), entry))
        except ValueError:  # nothing readable drawn: counts as a miss where a share is reported
            out.append((None, entry))
    return out


def _word(prompt: str, words: tuple[str, ...]) -> str | None:
    found = [w for w in words if re.search(rf"\b{w}\b", prompt or "")]
    return found[0] if found else None


def training_images(loaded: Any, store: Any) -> list[dict[str, Any]]:
    """Image k of the spot concept (k = 1..N, in training order): its reading and its edit's colour word."""
    out = []
    for k, (r, entry) in enumerate(reads(step_images(loaded, store, "spot-picks")), 1):
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
                place.append(attribute_error("spot", r))
        return {"position_error": error_stats(place, PLACE_WITHIN), "color_followed": float(np.mean(followed)),
                "images": len(rows)}

    plain = [x for c in ("red", "cyan", "yellow") for x in reads(step_images(loaded, store, f"plain-new-{c}"))]
    out["a1_new"] = {"two-phase": new_colors(reads(step_images(loaded, store, "a1-new"))),
                     "plain": new_colors(plain)}

    # <A1> <Bk>: place of the root, hue of image k; plain: "a <colour of k> square at the left"
    def place_and_hue(rows, k_of):
        place, hue = [], []
        for r, entry in rows:
            if r is None:
                continue
            place.append(attribute_error("spot", r))
            hue.append(hue_distance(r.hue, train[k_of(entry)]["hue"]))
        return {"position_error": error_stats(place, PLACE_WITHIN), "hue_error": error_stats(hue, HUE_WITHIN),
                "images": len(rows)}

    mine = reads(step_images(loaded, store, "a1-bk"))
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
        return {"hue_error": error_stats(hue, HUE_WITHIN), "position_followed": float(np.mean(right)),
                "images": len(rows)}

    mine = reads(step_images(loaded, store, "bk-right"))
    plain_rows, plain_k = _plain_per_k(loaded, store, train, "right")
    out["bk_right"] = {"two-phase": hue_and_right(mine, lambda e: _k_of(e["prompt"])),
                       "plain": hue_and_right(plain_rows, lambda e: plain_k[id(e)])}
    return out


def _plain_per_k(loaded: Any, store: Any, train: dict[int, dict[str, Any]], where: str):
    """The plain baseline of each image k: "a <colour of k> square at the <where>" (shared by the images of
    one colour; each compared with image k's own hue)."""
    rows, k_of = [], {}
    for k, t in train.items():
        for r, entry in reads(step_images(loaded, store, f"plain-{where}-{t['color']}")):
            entry = dict(entry)
            rows.append((r, entry))
            k_of[id(entry)] = k
    return rows, k_of


def part2(loaded: Any, store: Any) -> dict[str, Any]:
    out = {}
    for sid, rule in MIXES.items():
        rows = reads(step_images(loaded, store, sid))
        place = [attribute_error("spot", r) if r is not None else math.inf for r, _ in rows]
        hue = [hue_distance(r.hue, HUE.hue) if r is not None else math.inf for r, _ in rows]
        both = [p <= PLACE_WITHIN and h <= HUE_WITHIN for p, h in zip(place, hue)]
        out[sid] = {"rule": rule, "images": len(rows), "place_and_hue": float(np.mean(both)),
                    "place_within": float(np.mean([p <= PLACE_WITHIN for p in place])),
                    "hue_within": float(np.mean([h <= HUE_WITHIN for h in hue])),
                    "place_error": error_stats([p for p in place if math.isfinite(p)], PLACE_WITHIN),
                    "hue_error": error_stats([h for h in hue if math.isfinite(h)], HUE_WITHIN),
                    "square": float(np.mean([r is not None and r.shape == "square" for r, _ in rows])),
                    # at the hue root's own place (its concept's constant carries the centre, too)
                    "hue_root_place": float(np.mean([r is not None and math.hypot(r.x - HUE.x, r.y - HUE.y)
                                                     <= PLACE_WITHIN for r, _ in rows]))}
    return out


VARIATIONS = (1, 3, 5, 8, 16)
ABLATION_STEPS = {"s200": "200 + 200", "s400": "400 + 400", "s600": "600 + 600",
                  "s400cc": "400 + 400, cubic + conv"}  # the last: with part 4's fix for the layout
ABLATION_BASELINES = {"ti": "textual inversion alone, root only (800 steps)",
                      "db": "LoRA DreamBooth, root only (rare token, 800 steps)",
                      "plain": "plain prompt \"a <colour> square at the left\""}
NEW_COLORS = ("red", "cyan", "yellow")  # the ablation's new colour words (not among its edits)


def ablation(loaded: Any, store: Any, clip: Any | None = None) -> dict[str, Any]:
    """Part 3: every cell ``n{N}-{steps}`` of the grid and the baselines (see the module docstring)."""
    _PLANS.pop(id(loaded), None)
    present = step_ids(loaded, store)  # a smaller copy of the spec may leave cells out

    def row(*sids: str) -> dict[str, Any]:
        return _new_color_row([x for sid in sids for x in step_images(loaded, store, sid)], clip)

    grid = {f"n{n}-{s}": row(f"make-n{n}-{s}") for n in VARIATIONS for s in ABLATION_STEPS
            if f"make-n{n}-{s}" in present}
    base = {key: row(*sids) for key, sids in (("ti", ["make-ti"]), ("db", ["make-db"]),
                                              ("plain", [f"plain-{c}" for c in NEW_COLORS]))
            if all(sid in present for sid in sids)}
    return {"grid": grid, "baselines": base}


def _new_color_row(images: list[tuple[Any, dict[str, Any]]], clip: Any | None) -> dict[str, Any]:
    """Position error against the root, the share showing the prompt's new colour, and the CLIP consistencies
    (the pseudo-words read as "square", as the paper's metrics describe a concept in words)."""
    place, followed = [], []
    for r, entry in reads(images):
        followed.append(r is not None and r.color_name == _word(entry.get("prompt", ""), COLOR_WORDS))
        if r is not None:
            place.append(attribute_error("spot", r))
    row: dict[str, Any] = {"position_error": error_stats(place, PLACE_WITHIN), "color_followed": float(np.mean(followed)),
                           "unreadable": len(images) - len(place), "images": len(images)}
    if clip is not None and images:
        from ..metrics.evaluate import identity_consistency, prompt_consistency

        texts = [described(e.get("prompt", "")) for _, e in images]
        row["prompt_consistency"] = float(np.mean(prompt_consistency(clip, [im for im, _ in images], texts)))
        row["identity_consistency"] = identity_consistency(clip, [im for im, _ in images])
    return row


def described(prompt: str, word: str = "square") -> str:
    """``prompt`` with its pseudo-words as ``word`` ("a red <a1> square" -> "a red square")."""
    text = re.sub(r"<[^>]+>", word, prompt)
    text = re.sub(rf"\b{word}( {word})+\b", word, text)
    return re.sub(r"\s+", " ", text).strip()


MIXES3 = {  # three assets: "a <hue> <size> <spot>" -> the spot's place, hue 0.700, size 0.56, a square
    "mix3-paper": "paper's rule, <hue> first: hue 0.8 / size 0.5 / spot 0.5",
    "mix3-spot-first": "paper's rule, <spot> first (\"a <spot> <size> in <hue>\"): spot 0.8 / size 0.5 / hue 0.5",
    "mix3-spot-lora-only": "only the spot asset's LoRA: hue 0 / size 0 / spot 0.8",
    "mix3-size-alone": "the size asset alone, \"a blue <size>\" (size only)",
    "plain-mix3": "plain prompt \"a large blue square at the left\"",
}


def three_attribute_hits(rows: list[Any]) -> dict[str, list[bool]]:
    """Per reading (None: unreadable), whether each attribute of the three-asset experiments is exact: the
    spot's place, the hue, the size, and a square."""
    return {"place": [r is not None and attribute_error("spot", r) <= PLACE_WITHIN for r in rows],
            "hue": [r is not None and hue_distance(r.hue, HUE.hue) <= HUE_WITHIN for r in rows],
            "size": [r is not None and abs(r.size - SIZE.size) <= SIZE_WITHIN for r in rows],
            "square": [r is not None and r.shape == "square" for r in rows]}


def part2_three(loaded: Any, store: Any) -> dict[str, Any]:
    """Three assets in one prompt: how often each attribute, and all of them at once, is exact."""
    out = {}
    for sid, rule in MIXES3.items():
        rows = [r for r, _ in reads(step_images(loaded, store, sid))]
        hits = three_attribute_hits(rows)
        every = [all(h) for h in zip(*hits.values())]
        out[sid] = {"rule": rule, "images": len(rows), "all": float(np.mean(every)),
                    **{k: float(np.mean(v)) for k, v in hits.items()},
                    "size_error": error_stats([abs(r.size - SIZE.size) for r in rows if r is not None], SIZE_WITHIN)}
    return out


def measure(loaded: Any, store: Any) -> dict[str, Any]:
    """Parts 1 and 2 of issue 17 (see the module docstring)."""
    _PLANS.pop(id(loaded), None)
    return {"part1": part1(loaded, store), "part2": part2(loaded, store), "part2_three": part2_three(loaded, store)}


__all__ = ["measure", "part1", "part2", "ablation", "described", "step_images", "reads", "step_ids", "training_images", "MIXES",
           "MIXES3", "part2_three", "SIZE_WITHIN",
           "VARIATIONS", "ABLATION_STEPS", "ABLATION_BASELINES", "NEW_COLORS", "PLACE_WITHIN", "HUE_WITHIN"]
