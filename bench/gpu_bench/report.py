"""The GPU benchmark's report: the run's description (machine, versions, settings), a failed part as it is
recorded, the figures derived from others (each training row's fraction of the measured matmul rate), and
the report as markdown, every figure printed by :func:`fnum`."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import os
import platform
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .settings import BenchSettings

REPORT_FORMAT = "caspec-gpu-bench"
REPORT_VERSION = 1
MIB = 2 ** 20


def fnum(x: Any) -> str:
    """How every figure is printed in the markdown (4 significant digits; None as a dash)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def fmib(n_bytes: int | None) -> str:
    """A byte count printed in MiB."""
    return fnum(None if n_bytes is None else n_bytes / MIB)


def fratio(x: float | None) -> str:
    """A caspec/reference ratio: the number and ``×`` (a dash when it could not be computed)."""
    return "—" if x is None else fnum(x) + "×"


def error_record(exc: BaseException) -> dict[str, Any]:
    """A failed part as the report holds it: ``{"error": "Type: first line", "traceback": ...}`` (call it in
    the ``except`` block)."""
    return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            "traceback": traceback.format_exc(limit=12)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(s: BenchSettings, command: str | None) -> dict[str, Any]:
    """The report's ``meta``: format, date, command, machine, library versions and the settings."""
    import torch

    cuda = s.device == "cuda"
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command or " ".join([Path(sys.executable).name] + sys.argv),
        "size": s.size, "device": s.device,
        "card": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("torch", "diffusers", "transformers", "peft", "open_clip_torch",
                                               "accelerate", "safetensors", "tokenizers", "huggingface_hub")},
        "cuda": torch.version.cuda if cuda else None,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
    }


def derive(report: dict[str, Any]) -> None:
    """The figures computed from others: fractions of the matmul rate, the targets' verdicts."""
    mm = report.get("matmul")
    peak = mm.get("tflops") if isinstance(mm, dict) and "error" not in mm else None
    train = report.get("train")
    if isinstance(train, dict) and "rows" in train:
        for row in train["rows"]:
            for side in ("caspec", "reference"):
                r = row.get(side)
                if isinstance(r, dict) and "error" not in r:
                    eff = r.get("effective_tflops")
                    r["fraction_of_matmul"] = eff / peak if eff is not None and peak else None


def _ok(x: Any) -> bool:
    return isinstance(x, dict) and "error" not in x


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the machine, the command, every figure and every caspec/reference ratio."""
    m = report["meta"]
    st = m["settings"]
    v = m["versions"]
    lines = [f"# caspec GPU benchmark: {m['size']} on {m['card']}", "",
             f"- date: {m['date']}",
             f"- command: `{m['command']}`",
             f"- device: {m['device']} ({m['card']}); CPU {m['cpu']}, {m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads; Python {m['python']}"
             + (f", CUDA {m['cuda']}" if m.get("cuda") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- precision: caspec {st['dtype']} (VAE fp32, mixed_precision {st['mixed_precision']}); "
             f"references `--mixed_precision {st['ref_precision']}`",
             f"- import {fnum(m.get('import_s'))} s; total run {fnum(m.get('total_s'))} s; "
             f"process max RSS {fmib(m.get('max_rss_bytes'))} MiB"]
    b = report.get("build")
    if _ok(b):
        lines.append(f"- models (random weights, {b['resolution']}×{b['resolution']}): built in {fnum(b['seconds'])} s; "
                     + ", ".join(f"{k} {fnum(n / 1e6)} M params" for k, n in b["parameters"].items()))
    elif b is not None:
        lines.append(f"- building the models FAILED: {b.get('error')}")
    lines.append("- ratios are caspec / reference of the same run (rates: above 1 = caspec faster; "
                 "memory: below 1 = caspec smaller)")

    sd = report.get("sdedit")
    lines += ["", "## 1. SDEdit"]
    if _ok(sd):
        lines += [f"{sd['variations']} variations of one root, {sd['steps']} DDIM steps at strength {fnum(sd['strength'])} "
                  f"({sd['denoising_steps']} denoised), CFG {fnum(sd['guidance_scale'])}; median of {sd['repeats']} "
                  f"after one warm-up; caspec batch size {sd['caspec_batch_size']}", "",
                  "| side | median s | runs s | warm-up s | images/s |", "|---|---|---|---|---|"]
        for name, title in (("caspec", "caspec `sdedit`"), ("reference", "diffusers `StableDiffusionImg2ImgPipeline`")):
            r = sd[name]
            lines.append(f"| {title} | {fnum(r['median_s'])} | {', '.join(fnum(x) for x in r['runs_s'])} | "
                         f"{fnum(r['warmup_s'])} | {fnum(r['images_per_s'])} |")
        lines += ["", f"caspec / reference images/s: **{fratio(sd['ratio_images_per_s'])}**"]
    elif sd is not None:
        lines.append(f"FAILED: {sd.get('error')}")

    tr = report.get("train")
    lines += ["", "## 2. Training steps"]
    if _ok(tr):
        lines += [f"{tr['warmup_steps']} warm-up steps, {tr['timed_steps']} timed steps, then 1 step counted by "
                  f"FlopCounterMode; {tr['images']} images. Phase 1 reference: `textual_inversion.py` pattern; "
                  "phase 2 reference: `train_dreambooth_lora.py` pattern (LoRA only; caspec's phase 2 also trains "
                  "the new embedding rows). caspec caches latents; the references VAE-encode every step, so "
                  "their counted FLOPs include the encoder.", "",
                  "| phase | batch | side | samples/s | step ms | peak MiB | GFLOP/sample | effective TFLOP/s | "
                  "of matmul | loss first | loss last | loss mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in tr["rows"]:
            for side in ("caspec", "reference"):
                r = row[side]
                if not _ok(r):
                    lines.append(f"| {row['phase']} | {row['batch']} | {side} | FAILED: {r.get('error')} "
                                 "| | | | | | | | |")
                    continue
                lines.append(f"| {row['phase']} | {row['batch']} | {side} | {fnum(r['samples_per_s'])} | "
                             f"{fnum(r['step_ms'])} | {fmib(r['peak_mem_bytes'])} | {fnum(r['gflop_per_sample'])} | "
                             f"{fnum(r['effective_tflops'])} | {fnum(r.get('fraction_of_matmul'))} | "
                             f"{fnum(r['loss_first'])} | {fnum(r['loss_last'])} | {fnum(r['loss_mean'])} |")
        lines += ["", "| phase | batch | caspec / reference samples/s | caspec / reference peak memory |",
                  "|---|---|---|---|"]
        for row in tr["rows"]:
            lines.append(f"| {row['phase']} | {row['batch']} | **{fratio(row['ratio_samples_per_s'])}** | "
                         f"{fratio(row['ratio_peak_mem'])} |")
    elif tr is not None:
        lines.append(f"FAILED: {tr.get('error')}")

    lines += ["", "## 3. One concept end to end"]
    runs = [(name, report.get(name)) for name in ("e2e_cold", "e2e_warm") if name in report]
    good = [(name, r) for name, r in runs if _ok(r)]
    if good:
        r0 = good[0][1]
        lines += [f"{r0['candidates']} SDEdit candidates, CLIP selection (`{r0['clip_model']}`, keep "
                  f"{len(r0['kept'])}), {r0['phase1_steps']} + {r0['phase2_steps']} training steps at batch "
                  f"{r0['batch']}, asset written and read back. cold: the first work in the process (after the "
                  "model build); warm: the last.", "",
                  "| run | total s | load | sdedit | clip | load fresh | train | save | train loop | "
                  "phase 1 step ms | phase 2 step ms | projected 1000+1000 s | peak MiB | loss initial | loss final |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in good:
            p = r["parts"]
            lines.append(f"| {r['label']} | {fnum(r['total_s'])} | {fnum(p['load_s'])} | {fnum(p['sdedit_s'])} | "
                         f"{fnum(p['clip_s'])} | {fnum(p['load_fresh_s'])} | {fnum(p['train_s'])} | "
                         f"{fnum(p['save_s'])} | {fnum(r['train_loop_s'])} | {fnum(r['phase1_step_ms'])} | "
                         f"{fnum(r['phase2_step_ms'])} | {fnum(r['projected_1000_1000_s'])} | "
                         f"{fmib(r['peak_mem_bytes'])} | {fnum(r['initial_loss'])} | {fnum(r['final_loss'])} |")
        lines.append("")
        lines.append(f"asset files: {', '.join(r0['asset_files'])}")
    for name, r in runs:
        if not _ok(r):
            lines.append(f"{name} FAILED: {r.get('error') if isinstance(r, dict) else r}")

    lines += ["", "## 4. Hardware rate"]
    mm = report.get("matmul")
    if _ok(mm):
        lines.append(f"measured {mm['dtype']} matmul ({mm['n']}×{mm['n']}×{mm['n']}, {mm['iters']} iterations): "
                     f"**{fnum(mm['tflops'])} TFLOP/s**; each training row's effective TFLOP/s and its fraction of "
                     "this rate are in section 2.")
    elif mm is not None:
        lines.append(f"FAILED: {mm.get('error')}")
    return "\n".join(lines) + "\n"
