"""Where an SDEdit starts: diffusers' ``strength`` against caspec's ``noise_level``, read from the schedulers' code.

For each model setting the start step and its noise level are taken from diffusers itself, not re-derived:

* SD 1.5 and SDXL: ``DDIMScheduler.set_timesteps(50)`` with the model's scheduler config, the img2img pipelines'
  own ``get_timesteps(steps, strength)`` (``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline``)
  and the noise ``DDIMScheduler.add_noise`` puts on an image at the start timestep (``add_noise(1, 0, t)`` = √ᾱ,
  ``add_noise(0, 1, t)`` = √(1-ᾱ)), reported as the flow-matching σ of the same signal-to-noise ratio,
  σ = √(1-ᾱ) / (√ᾱ + √(1-ᾱ));
* FLUX.1-dev (512², 1024², 28 steps) and FLUX.1-schnell (4 steps): what ``FluxImg2ImgPipeline.__call__`` does,
  ``sigmas = linspace(1, 1/N, N)``, ``mu = calculate_shift(image_seq_len, ...)`` and ``retrieve_timesteps`` (both
  imported from diffusers' ``pipeline_flux_img2img``), its ``get_timesteps(steps, strength)`` (which sets the
  scheduler's begin index), and σ as ``FlowMatchEulerDiscreteScheduler.scale_noise(0, t, 1)`` returns it.

``noise_level`` starts are caspec's (:func:`caspec.families.noise.edit_start`), and checked against the same rule
applied to diffusers' own σ and to the reference σ read from a ``DDIMScheduler`` with SD 1.x's betas. Cross-check:
caspec's pure-numpy ``step_sigmas`` (and DDIM timesteps, and ``strength_start``) must equal diffusers' to 1e-6 for
every case in the table and on a wider grid (steps, resolutions, timestep spacings, strengths, noise levels); any
mismatch is printed with its case and the exit status is 1.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/noise_table.py [--readme PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TOL = 1e-6
VALUES = (0.6, 0.75, 0.86)
VAE = {"block_out_channels": [128, 256, 512, 512]}  # FLUX.1's VAE (and SD's): vae_scale_factor 8
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "trained_betas": None}
SDXL = {**SD15, "timestep_spacing": "leading"}


def flux_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    from caspec.models.tiny_flux import SCHEDULER_DEV, SCHEDULER_SCHNELL

    return dict(SCHEDULER_DEV), dict(SCHEDULER_SCHNELL)


DEV, SCHNELL = flux_configs()
CASES = (  # label, family, scheduler config, steps, resolution
    ("SD 1.5, DDIM", "sd1", SD15, 50, 512),
    ("SDXL, DDIM", "sdxl", SDXL, 50, 1024),
    ("FLUX.1-dev 512²", "flux", DEV, 28, 512),
    ("FLUX.1-dev 1024²", "flux", DEV, 28, 1024),
    ("FLUX.1-schnell", "flux", SCHNELL, 4, 1024),
)
MISMATCHES: list[str] = []


def mismatch(what: str) -> None:
    MISMATCHES.append(what)
    print(f"!!! MISMATCH: {what}", file=sys.stderr)


# ---------------------------------------------------------------------------- diffusers' side


def flow_sigma(a_sqrt: float, b_sqrt: float) -> float:
    return b_sqrt / (a_sqrt + b_sqrt)


class DiffusersDDIM:
    """DDIMScheduler + the SD / SDXL img2img pipelines' ``get_timesteps``."""

    def __init__(self, config: dict[str, Any], steps: int, sdxl: bool) -> None:
        from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

        self.sched = DDIMScheduler.from_config(config)
        self.sched.set_timesteps(steps)
        self.steps = steps
        self.pipe_cls = StableDiffusionXLImg2ImgPipeline if sdxl else StableDiffusionImg2ImgPipeline

    def sigma_at(self, t: int) -> float:
        tt = torch.tensor([int(t)])
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        a = float(self.sched.add_noise(one, zero, tt))  # √ᾱ
        b = float(self.sched.add_noise(zero, one, tt))  # √(1-ᾱ)
        return flow_sigma(a, b)

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.sched.timesteps]

    def step_sigmas(self) -> list[float]:
        return [self.sigma_at(t) for t in self.timesteps]

    def strength_start(self, strength: float) -> int:
        _, remaining = self.pipe_cls.get_timesteps(SimpleNamespace(scheduler=self.sched), self.steps, strength, "cpu")
        return self.steps - remaining


class DiffusersFlux:
    """FlowMatchEulerDiscreteScheduler set up as ``FluxImg2ImgPipeline.__call__`` does, and its ``get_timesteps``."""

    def __init__(self, config: dict[str, Any], steps: int, resolution: int) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline
        from diffusers.pipelines.flux.pipeline_flux_img2img import calculate_shift, retrieve_timesteps

        self.sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        vae_scale_factor = 2 ** (len(VAE["block_out_channels"]) - 1)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        image_seq_len = (int(resolution) // vae_scale_factor // 2) * (int(resolution) // vae_scale_factor // 2)
        self.mu = calculate_shift(image_seq_len, self.sched.config.get("base_image_seq_len", 256),
                                  self.sched.config.get("max_image_seq_len", 4096),
                                  self.sched.config.get("base_shift", 0.5), self.sched.config.get("max_shift", 1.15))
        _, self.steps = retrieve_timesteps(self.sched, steps, "cpu", sigmas=sigmas, mu=self.mu)
        self.pipe_cls = FluxImg2ImgPipeline

    def step_sigmas(self) -> list[float]:
        return [float(s) for s in self.sched.sigmas[:self.steps]]

    def strength_start(self, strength: float) -> int:
        _, remaining = self.pipe_cls.get_timesteps(SimpleNamespace(scheduler=self.sched), self.steps, strength, "cpu")
        self.sched._begin_index = None
        return self.steps - remaining

    def start_sigma(self, strength: float) -> float:
        """σ of the noised image: ``scale_noise(x0 = 0, t_start, noise = 1)`` after ``get_timesteps``."""
        ts, _ = self.pipe_cls.get_timesteps(SimpleNamespace(scheduler=self.sched), self.steps, strength, "cpu")
        if len(ts) == 0:
            raise ValueError("no step runs")
        out = self.sched.scale_noise(torch.zeros(1, dtype=torch.float64), ts[:1], torch.ones(1, dtype=torch.float64))
        self.sched._begin_index = None
        return float(out)


def diffusers_side(family: str, config: dict[str, Any], steps: int, resolution: int) -> Any:
    if family == "flux":
        return DiffusersFlux(config, steps, resolution)
    return DiffusersDDIM(config, steps, sdxl=family == "sdxl")


def reference_sigma_diffusers(noise_level: float) -> float:
    """``noise_level``'s σ from a DDIMScheduler with SD 1.x's betas: timestep ``round(T × 1000) - 1``."""
    d = DiffusersDDIM(SD15, 50, sdxl=False)
    return d.sigma_at(min(max(int(round(noise_level * 1000)) - 1, 0), 999))


def first_at_most(sigmas: list[float], target: float) -> int:
    return next((i for i, s in enumerate(sigmas) if s <= target + 1e-12), len(sigmas))


# ---------------------------------------------------------------------------- caspec's side


def configs_of(config: dict[str, Any]) -> dict[str, Any]:
    return {"scheduler": config, "vae": VAE}


def caspec_start(family: str, config: dict[str, Any], steps: int, resolution: int, **kw: float) -> tuple[Any, Any]:
    from caspec import families
    from caspec.families.noise import PureNoiseStart, edit_start

    fam = families.get(family)
    try:
        return edit_start(fam, configs_of(config), steps, resolution, **kw)
    except PureNoiseStart:
        start = (fam.strength_start(steps, kw["strength"]) if "strength" in kw
                 else first_at_most(fam.step_sigmas(configs_of(config), steps, resolution), 0))
        return start, "pure noise"
    except ValueError as exc:
        return None, str(exc)


# ---------------------------------------------------------------------------- checks


def compare_schedules(label: str, family: str, config: dict[str, Any], steps: int, resolution: int) -> float:
    from caspec import families
    from caspec.families.noise import ddim_timesteps

    fam = families.get(family)
    d = diffusers_side(family, config, steps, resolution)
    ours = fam.step_sigmas(configs_of(config), steps, resolution)
    theirs = d.step_sigmas()
    if len(ours) != len(theirs):
        mismatch(f"{label}: caspec has {len(ours)} step sigmas, diffusers {len(theirs)}")
        return float("inf")
    if family != "flux":
        ot, tt = [int(t) for t in ddim_timesteps(config, steps)], d.timesteps
        if ot != tt:
            mismatch(f"{label}: DDIM timesteps differ: caspec {ot[:6]}..., diffusers {tt[:6]}...")
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    if diff > TOL:
        i = max(range(len(ours)), key=lambda k: abs(ours[k] - theirs[k]))
        mismatch(f"{label}: step σ differ by {diff:.2e} at step {i}: caspec {ours[i]:.9f}, diffusers {theirs[i]:.9f}")
    return diff


def grid_check() -> tuple[int, float]:
    """Wider grid: every step's σ, strength starts and noise_level starts, caspec against diffusers."""
    from caspec import families

    cases = []
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 10, 25, 28, 50, 100):
            cfg = {**SD15, "timestep_spacing": spacing}
            cases.append((f"DDIM {spacing} {steps}", "sd1", cfg, steps, 512))
    for name, cfg in (("dev", DEV), ("schnell", SCHNELL), ("shift 3", {**SCHNELL, "shift": 3.0})):
        for steps in (1, 2, 4, 8, 20, 28, 50):
            for res in (256, 512, 768, 1024, 1360, 1000):
                cases.append((f"flux {name} {steps} steps {res}²", "flux", cfg, steps, res))
    worst = 0.0
    strengths = [round(0.05 * k, 2) for k in range(1, 21)] + [0.33, 0.66, 0.77, 0.86, 0.99]
    levels = [round(0.05 * k, 2) for k in range(1, 21)] + [0.33, 0.66, 0.86, 0.99]
    refs = {lv: reference_sigma_diffusers(lv) for lv in levels}
    from caspec.families.noise import reference_sigma

    for lv, ref in refs.items():
        if abs(reference_sigma(lv) - ref) > TOL:
            mismatch(f"reference σ of noise_level {lv}: caspec {reference_sigma(lv):.9f}, diffusers {ref:.9f}")
    for label, family, cfg, steps, res in cases:
        worst = max(worst, compare_schedules(label, family, cfg, steps, res))
        fam = families.get(family)
        d = diffusers_side(family, cfg, steps, res)
        theirs = d.step_sigmas()
        for s in strengths:
            if fam.strength_start(steps, s) != d.strength_start(s):
                mismatch(f"{label}: strength {s} starts at step {fam.strength_start(steps, s)} in caspec, "
                         f"{d.strength_start(s)} in diffusers")
        ours = fam.step_sigmas(configs_of(cfg), steps, res)
        for lv, ref in refs.items():
            a, b = first_at_most(ours, reference_sigma(lv)), first_at_most(theirs, ref)
            if a != b:
                mismatch(f"{label}: noise_level {lv} starts at step {a} in caspec, {b} from diffusers' σ")
    return len(cases), worst


# ---------------------------------------------------------------------------- table


def fmt_start(start: Any, sigma: Any) -> str:
    if start is None:
        return f"— ({sigma})"
    if isinstance(sigma, str):
        return f"{start} / 1.000 (pure noise: caspec refuses)"
    return f"{start} / {sigma:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=None, help="also write the short markdown table here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    from caspec import families
    from caspec.families.noise import reference_sigma

    sd15 = DiffusersDDIM(SD15, 50, sdxl=False)
    sd_target = sd15.sigma_at(sd15.timesteps[sd15.strength_start(0.86)])
    rows, short = [], []
    for label, family, cfg, steps, res in CASES:
        d = diffusers_side(family, cfg, steps, res)
        diff = compare_schedules(label, family, cfg, steps, res)
        theirs = d.step_sigmas()
        fam = families.get(family)
        cells = {}
        for kind in ("strength", "noise_level"):
            for v in VALUES:
                if kind == "strength":
                    start = d.strength_start(v)
                    sigma = d.start_sigma(v) if family == "flux" else d.sigma_at(d.timesteps[start])
                    if abs(sigma - theirs[start]) > TOL:
                        mismatch(f"{label}: strength {v}: the noised image's σ {sigma:.9f} is not step {start}'s "
                                 f"σ {theirs[start]:.9f}")
                else:
                    start = first_at_most(theirs, reference_sigma_diffusers(v))
                    sigma = theirs[start] if start < len(theirs) else float("nan")
                c_start, c_sigma = caspec_start(family, cfg, steps, res, **{kind: v})
                c_val = 1.0 if isinstance(c_sigma, str) and c_sigma == "pure noise" else c_sigma
                if c_start != start or (isinstance(c_val, float) and abs(c_val - sigma) > TOL):
                    mismatch(f"{label}: {kind} {v}: diffusers start {start} σ {sigma:.9f}, caspec {c_start} {c_sigma}")
                ours = fmt_start(c_start, c_sigma)
                rows.append((label, steps, kind, v, start, sigma, ours, diff))
                cells[(kind, v)] = f"{'1.000*' if isinstance(c_sigma, str) else f'{sigma:.3f}'} ({start})"
        # the raw strength that starts at SD 1.5's noise at strength 0.86
        if family == "flux":
            mu = d.mu if cfg.get("use_dynamic_shifting") else None
            if mu is not None:
                cont = 1.0 / (1.0 + np.exp(mu) * (1.0 / sd_target - 1.0))
            else:
                shift = float(cfg.get("shift", 1.0))
                cont = sd_target / (shift - (shift - 1.0) * sd_target)
            k = first_at_most(theirs, sd_target)
            lo, hi = (steps - k - 1) / steps, (steps - k) / steps
            assert d.strength_start(hi) == k, (label, hi, k)
            match = f"{cont:.2f}; at {steps} steps ({lo:.3f}, {hi:.3f}] starts at step {k}, σ {theirs[k]:.3f}"
        else:
            match = "0.86"
        short.append((label, steps, cells, match))
    n_grid, worst = grid_check()
    elapsed = time.perf_counter() - t0

    print("## SDEdit start: strength vs noise_level (from the schedulers' code)\n")
    print(f"SD 1.5 at strength 0.86 (DDIM, 50 steps) starts at timestep {sd15.timesteps[sd15.strength_start(0.86)]}, "
          f"flow-equivalent σ {sd_target:.4f}; noise_level 0.86 is SD 1.x's SNR at timestep 859, σ "
          f"{reference_sigma(0.86):.4f}.\n")
    print("| model, sampler | steps | setting | start step (diffusers) | σ (diffusers) | caspec: start / σ | "
          "max |Δσ| caspec vs diffusers, all steps |\n|---|---|---|---|---|---|---|")
    for label, steps, kind, v, start, sigma, ours, diff in rows:
        print(f"| {label} | {steps} | {kind} {v} | {start} | {sigma:.4f} | {ours} | {diff:.1e} |")
    table = ["| model, sampler | steps | strength 0.6 / 0.75 / 0.86: start σ (step) | noise_level 0.6 / 0.75 / 0.86: "
             "start σ (step) | strength matching SD 1.5's 0.86 |", "|---|---|---|---|---|"]
    for label, steps, cells, match in short:
        s = " / ".join(cells[("strength", v)] for v in VALUES)
        n = " / ".join(cells[("noise_level", v)] for v in VALUES)
        table.append(f"| {label} | {steps} | {s} | {n} | {match} |")
    note = ("σ is the flow-matching noise level of the start step (x_t = (1-σ) x0 + σ ε; for DDIM the σ of the "
            "same SNR), from diffusers' schedulers and img2img pipelines' `get_timesteps`; "
            "1.000* = pure noise, the source image is discarded (caspec refuses it). Matching strength: the "
            "continuous value whose σ is SD 1.5's at 0.86 (σ 0.861), and the strengths that start at the first step "
            "at or below it.")
    print("\n" + "\n".join(table) + "\n\n" + note)
    print(f"\nCross-check: the {len(CASES)} cases above plus a grid of {n_grid} schedules (DDIM leading / trailing / "
          f"linspace x 6 step counts; FLUX dev / schnell / shift-3 x 7 step counts x 6 resolutions), each with "
          f"25 strengths and 24 noise levels: largest |Δσ| between caspec's numpy step_sigmas and diffusers' "
          f"{worst:.1e}; mismatches: {len(MISMATCHES)}.")
    for m in MISMATCHES:
        print(f"  MISMATCH: {m}")
    print(f"elapsed {elapsed:.1f} s")
    if args.readme:
        args.readme.write_text("\n".join(table) + "\n\n" + note + "\n", encoding="utf-8")
    return 1 if MISMATCHES else 0


if __name__ == "__main__":
    sys.exit(main())
