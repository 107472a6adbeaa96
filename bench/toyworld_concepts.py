"""Benchmark: issue 6's concept-extraction experiment on the `toy` shapes world (2-core CPU, a few minutes).

Runs ``specs/toy-concepts.yaml`` with caspec (roots -> SDEdit -> CLIP selection -> three ways of training
-> compose), then reads every composed image with the exact attribute reader: the error of the exact
attribute (position for the `spot` concept, hue for the `hue` concept) against the root, mean and spread,
for (a) the best plain-text prompt, (b) textual inversion only, (c) LoRA only, (d) caspec's two-phase
method; plus the paper's CLIP metrics with the toy CLIP, plotted like the paper's Fig. 5.

Usage: python bench/toyworld_concepts.py [--spec PATH] [--store DIR] [--json PATH] [--plot PATH]
(``--spec``: a variant of the experiment spec with the same step names, e.g. other training settings.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from caspec.metrics.clip import ClipSpec, load_clip
from caspec.spec.load import load_spec
from caspec.store import open_store
from caspec.toyworld.experiment import METHOD_NAMES, METHODS, OPTION_METHODS, ROOTS, WITHIN, measure, paired, plot, root_image

from experiment_run import report, run_timed  # bench/: the drivers' shared run-and-report

SPEC = Path(__file__).resolve().parent.parent / "specs" / "toy-concepts.yaml"


def table(result: dict) -> str:
    lines = []
    for concept in ("spot", "hue"):
        what = "position error (fraction of width)" if concept == "spot" else "hue error (fraction of the hue circle)"
        follow = "new colour shown" if concept == "spot" else "new shape shown"
        lines += [f"**{concept}** ({what}; root: {ROOTS[concept]})", "",
                  f"| method | mean | sd | median | within {WITHIN[concept]} | {follow} | prompt consistency | "
                  "identity consistency | images |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in METHODS + OPTION_METHODS:
            r = result[concept].get(method)
            if r is None:
                continue
            e = r["error"] or {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "within": float("nan")}
            lines.append(f"| {METHOD_NAMES[method]} | {e['mean']:.3f} | {e['std']:.3f} | {e['median']:.3f} | "
                         f"{e['within']:.0%} | "
                         f"{r['new_word_followed']:.0%} | {r.get('prompt_consistency', float('nan')):.3f} | "
                         f"{r.get('identity_consistency') or float('nan'):.3f} | {r['images']} |")
        lines.append("")
    return "\n".join(lines)


def paired_table(pairs: dict) -> str:
    """The seed-by-seed comparisons (``a - b``) of the pairs the spec has, and those it could not pair."""
    lines = []
    if pairs["rows"]:
        lines += ["Paired differences on the shared seeds (`a - b`):", "",
                  "| concept | a | b | mean difference | paired SE | a better on |", "|---|---|---|---|---|---|"]
        for r in pairs["rows"]:
            lines.append(f"| {r['concept']} | {METHOD_NAMES[r['a']]} | {METHOD_NAMES[r['b']]} | "
                         f"{r['mean_difference']:+.4f} | {r['paired_se']:.4f} | {r['a_better']} of {r['n']} |")
    for r in pairs["skipped"]:
        lines.append(f"not paired: {r['concept']} {r['a']} - {r['b']}: {r['why']}")
    return "\n".join(lines) + ("\n" if lines else "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(SPEC), help="the experiment spec (default: specs/toy-concepts.yaml)")
    ap.add_argument("--store", default=None, help="store directory (default: .caspec beside the spec)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    spec = Path(args.spec)
    for name in ROOTS:  # the committed roots are exactly the renders the experiment describes
        committed = SPEC.parent / "toy-concepts" / f"{name}.png"
        from PIL import Image

        with Image.open(committed) as im:
            assert im.convert("RGB").tobytes() == root_image(name).tobytes(), f"{committed} differs from its render"
    loaded = load_spec(spec)
    store = open_store(Path(args.store) if args.store else spec.parent / ".caspec")
    seconds = run_timed(loaded, store)
    if seconds is None:
        return 1
    clip = load_clip(ClipSpec(model="caspec-toy-clip"))
    result = measure(loaded, store, clip)
    pairs = paired(loaded, store)
    report(table(result) + paired_table(pairs), {**result, "paired": pairs}, seconds, args.json)
    if args.plot:
        plot(result, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
