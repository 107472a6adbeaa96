"""Benchmark (issue 7): caspec against the diffusers reference patterns on one GPU (or at tiny size on the CPU).

Writes OUT/gpu-bench.json and OUT/gpu-bench.md (both rewritten after every section, so a run that is
killed still leaves what it finished) and prints the markdown. What is measured, and how, is the
docstring of bench/gpu_bench/__init__.py (the harness, a package next to this file).

Usage:
  python bench/gpu.py --size sd15 --device cuda --out DIR [--phase1-steps N --phase2-steps N] [--quick]
  python bench/gpu.py --size tiny --device cpu --out DIR --quick      # the CPU smoke run

--phase1-steps/--phase2-steps: the end-to-end concept's training steps (default 1000 + 1000 for sd15;
with fewer, the time of 1000 + 1000 is projected from the run's own step times). --quick: fewer repeats
and steps everywhere (a smoke run, not figures to report).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (ROOT, BENCH):  # caspec from this working tree (not installed on the GPU machine); gpu_bench
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def _write(out: Path, report: dict) -> str:
    from gpu_bench import markdown

    text = markdown(report)
    for name, data in (("gpu-bench.json", json.dumps(report, indent=1, default=str) + "\n"), ("gpu-bench.md", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(data, encoding="utf-8")
        tmp.replace(out / name)
    return text


def main(argv: list[str] | None = None) -> int:
    from gpu_bench import PRESET_NAMES, SECTIONS, run_benchmark, settings_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=PRESET_NAMES, default="sd15")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu-bench.json and gpu-bench.md")
    ap.add_argument("--phase1-steps", type=int, help="end-to-end phase-1 steps (default: the size's, 1000 for sd15)")
    ap.add_argument("--phase2-steps", type=int, help="end-to-end phase-2 steps (default: the size's, 1000 for sd15)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps (smoke run)")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="caspec's dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--ref-precision", choices=("no", "fp16", "bf16"),
                    help="the reference scripts' --mixed_precision (default fp16 on CUDA, no on CPU)")
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="caspec TrainConfig.mixed_precision")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    ap.add_argument("--train-steps", type=int, help="timed steps per training run")
    ap.add_argument("--train-warmup", type=int, help="untimed steps before them")
    ap.add_argument("--sdedit-repeats", type=int)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = ap.parse_args(argv)

    overrides = {k: v for k, v in {
        "dtype": args.dtype, "ref_precision": args.ref_precision, "mixed_precision": args.mixed_precision,
        "train_steps": args.train_steps, "train_warmup": args.train_warmup, "sdedit_repeats": args.sdedit_repeats,
        "sections": tuple(x.strip() for x in args.sections.split(",") if x.strip()),
    }.items() if v is not None}
    try:
        settings = settings_for(args.size, args.device, quick=args.quick, phase1_steps=args.phase1_steps,
                                phase2_steps=args.phase2_steps, **overrides)
    except ValueError as exc:
        ap.error(str(exc))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/gpu.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = run_benchmark(settings, command=command, on_section=lambda r: _write(args.out, r), log=log)
    print(_write(args.out, report), end="")
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    rows = report.get("train", {}).get("rows", []) if isinstance(report.get("train"), dict) else []
    failed += [f"train p{r['phase']} b{r['batch']} {side}" for r in rows for side in ("caspec", "reference")
               if isinstance(r.get(side), dict) and "error" in r[side]]
    if failed:
        log(f"FAILED parts: {', '.join(failed)} (errors and tracebacks are in {args.out / 'gpu-bench.json'})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
