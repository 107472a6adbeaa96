"""Benchmark: issue 17, parts 1 and 2 (with the three-asset prompt), on the `toy` shapes world (2-core CPU, a few minutes).

Runs ``specs/toy-claims.yaml`` with caspec (roots -> SDEdit -> CLIP selection -> two-phase training of the
`spot` and `hue` concepts -> compose), then reads every image with the exact attribute reader
(:mod:`caspec.toyworld.claims`): disentangled pseudo-words within one training (part 1) and two assets
from different trainings in one prompt under several LoRA scale rules (part 2), against plain prompts.

Usage: python bench/toyworld_claims.py [--store DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from caspec.spec.load import load_spec
from caspec.store import open_store
from caspec.toyworld.claims import MIXES, MIXES3, measure

from experiment_run import report, run_timed  # bench/: the drivers' shared run-and-report

SPEC = Path(__file__).resolve().parent.parent / "specs" / "toy-claims.yaml"


def _err(s: dict | None) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:.3f} ± {s['std']:.3f} (median {s['median']:.3f}, {s['within']:.0%} within {s['tolerance']})"


def tables(result: dict) -> str:
    p1, p2 = result["part1"], result["part2"]
    lines = ["**Part 1: one training, disentangled pseudo-words** (spot concept; errors against the root's "
             "exact place (0.30, 0.62) and image k's own hue)", "",
             "| measure | method | position error | hue error vs image k | word followed | images |",
             "|---|---|---|---|---|---|"]
    for name, label, follow in (("a1_new", "`<spot>` + new colour word", "color_followed"),
                                ("a1_bk", "`<spot> <spot-ck>`, every k", None),
                                ("bk_right", "`<spot-ck>` + \"at the right\"", "position_followed")):
        for method in ("two-phase", "plain"):
            r = p1[name][method]
            lines.append(f"| {label} | {method} | {_err(r.get('position_error'))} | {_err(r.get('hue_error'))} | "
                         f"{format(r[follow], '.0%') if follow else '-'} | {r['images']} |")
    lines += ["", "**Part 2: two assets trained apart, one prompt** (`a <hue> <spot>`: hue 0.700 and the place "
              "(0.30, 0.62))", "",
              "| scales (hue / spot) | place and hue | place within 0.1 | hue within 0.02 | square drawn | "
              "at the hue root's place (centre) | images |", "|---|---|---|---|---|---|---|"]
    for sid in MIXES:
        r = p2[sid]
        lines.append(f"| {r['rule']} | {r['place_and_hue']:.0%} | {r['place_within']:.0%} | {r['hue_within']:.0%} | "
                     f"{r['square']:.0%} | {r['hue_root_place']:.0%} | {r['images']} |")
    lines += ["", "**Part 2, three assets: `a <hue> <size> <spot>`** (the spot's place, hue 0.700, size 0.56 "
              "within 0.03, a square)", "",
              "| rule | all four | place within 0.1 | hue within 0.02 | size within 0.03 | square | images |",
              "|---|---|---|---|---|---|---|"]
    for sid in MIXES3:
        r = result["part2_three"][sid]
        lines.append(f"| {r['rule']} | {r['all']:.0%} | {r['place']:.0%} | {r['hue']:.0%} | {r['size']:.0%} | "
                     f"{r['square']:.0%} | {r['images']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="store directory (default: .caspec beside the spec)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    loaded = load_spec(SPEC)
    store = open_store(Path(args.store) if args.store else SPEC.parent / ".caspec")
    seconds = run_timed(loaded, store)
    if seconds is None:
        return 1
    result = measure(loaded, store)
    report(tables(result), result, seconds, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
