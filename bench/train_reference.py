"""Benchmark: concept-training steps per second, caspec's trainer against the reference pattern (not a test).

The reference is a self-contained re-implementation of the pattern of diffusers'
``examples/textual_inversion/textual_inversion.py`` (:class:`ReferenceTI`): the new tokens are added
to the tokenizer, the text encoder's embedding table is resized and the new rows are initialised
from the initializer words; everything is frozen except the *whole* token-embedding table, which
AdamW (lr 5e-3, weight decay 1e-2) updates every step; each step preprocesses and tokenizes its
batch (as the example's dataset does), VAE-encodes the images (``latent_dist.sample() *
scaling_factor``), adds noise at random timesteps, text-encodes the captions, predicts with the
UNet, takes the MSE, steps, and then restores every non-new row from a saved copy under no_grad
(the example's ``index_no_updates``). fp32 on the CPU.

caspec's side is :func:`caspec.train.train_concept` with phase 1 only (new embedding rows only,
VAE latents cached once), ``TrainConfig(phase1_steps=N, phase2_steps=0, batch_size=B,
checkpoint_every=0, preview_every=0)`` and no preview prompts.

Timing: only the step loop. Both sides take a timestamp after every optimizer step (caspec through
its ``progress`` callback); the rate is ``(N - 1) / (t_last - t_first)``, i.e. steps 2..N. Set-up
(loading, adding tokens, caching latents, LoRA injection) and the end (writing the asset) are
left out, and so is step 1 (optimizer state allocation). Each run gets a freshly loaded tiny pipe
(loading is not timed); after one warm-up run of each, the two are alternated (ABBA...) for
``--repeats`` repeats and the medians are reported. Phase 2 (embeddings + LoRA) is timed for caspec
alone, for information.

The reference's step is also timed in parts (data, VAE encode, text encoder + UNet forward and
backward, AdamW, restoring the rows) to show where the difference comes from.

CPU threads: with torch's default of one OpenMP thread per core, any other busy process on the
machine makes every parallel region wait for a descheduled thread (on the 2-core machine a tiny op
can go from microseconds to milliseconds): measure on an idle machine, or pass ``--threads 1``.

Usage: python bench/train_reference.py [--steps N] [--batch B ...] [--repeats R] [--warmup W]
                                       [--threads T] [--no-phase2] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from caspec.train import PseudoWord, TrainConfig  # noqa: E402

RESOLUTION = 64
REF_LR = 5e-3
REF_WEIGHT_DECAY = 1e-2
# the parts of a reference step, timed separately (for the breakdown)
PHASES = ("data", "vae_encode", "forward_backward", "optimizer", "restore_rows")
COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30)]


# --------------------------------------------------------------------------------------- inputs


def make_words(n: int = 4) -> list[PseudoWord]:
    """One shared word ``<dance1>`` and one varied word per image ``<robotK>``."""
    return [PseudoWord("<dance1>", "dance", "constant")] + [
        PseudoWord(f"<robot{k}>", "robot", "varied") for k in range(1, n + 1)]


def make_items(n: int = 4, size: int = RESOLUTION) -> list[tuple[Image.Image, str]]:
    """``n`` coloured squares on grey (``size``², drawn with numpy), captions ``a photo of <dance1> <robotK>``."""
    out = []
    for k in range(n):
        a = np.full((size, size, 3), 128, np.uint8)
        lo, hi = size // 4 + 2 * k, 3 * size // 4 - k
        a[lo:hi, lo:hi] = COLOURS[k % len(COLOURS)]
        out.append((Image.fromarray(a), f"a photo of <dance1> <robot{k + 1}>"))
    return out


def fresh_pipe() -> Any:
    from caspec.models.load import load_pipeline
    from caspec.spec.models import ModelSpec

    return load_pipeline(ModelSpec(), ROOT, fresh=True)


# ------------------------------------------------------------------------------- the reference


class ReferenceTI:
    """The textual-inversion training pattern of diffusers' example script, on a caspec ``Pipe``.

    Modifies ``pipe`` in place (tokens, embedding table): give it a fresh pipe.
    """

    def __init__(self, pipe: Any, words: list[PseudoWord], items: list[tuple[Image.Image, str]], *,
                 batch_size: int = 1, lr: float = REF_LR, weight_decay: float = REF_WEIGHT_DECAY,
                 resolution: int = RESOLUTION, seed: int = 0) -> None:
        from diffusers import DDPMScheduler

        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        self.unet, self.vae, self.device = pipe.unet, pipe.vae, pipe.device
        self.weight_dtype = torch.float32
        self.items, self.batch_size, self.resolution = list(items), batch_size, resolution
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        # new tokens, resized table, new rows initialised from the initializer words
        tokens = [w.token for w in words]
        if self.tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError("the tokenizer already contains some placeholder tokens")
        init_ids = []
        for w in words:
            ids = self.tokenizer.encode(w.init_word, add_special_tokens=False)
            init_ids.append(ids[0])
        self.placeholder_ids = self.tokenizer.convert_tokens_to_ids(tokens)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        token_embeds = self.text_encoder.get_input_embeddings().weight.data
        with torch.no_grad():
            for pid, iid in zip(self.placeholder_ids, init_ids):
                token_embeds[pid] = token_embeds[iid].clone()

        # freeze everything but the token-embedding table (the whole table is trainable)
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.text_encoder.get_input_embeddings().weight.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.text_encoder.get_input_embeddings().parameters(), lr=lr,
                                           betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
        self.orig_embeds_params = self.text_encoder.get_input_embeddings().weight.data.clone()
        self.index_no_updates = torch.ones((len(self.tokenizer),), dtype=torch.bool)
        self.index_no_updates[torch.tensor(self.placeholder_ids)] = False
        self.text_encoder.train()

        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self.losses: list[float] = []
        self.phase_s: dict[str, list[float]] = {name: [] for name in PHASES}  # seconds per step, by part

    # the example's TextualInversionDataset.__getitem__ (no flips, like caspec's default)
    def _example(self, k: int) -> dict[str, torch.Tensor]:
        image, caption = self.items[k]
        input_ids = self.tokenizer(caption, padding="max_length", truncation=True,
                                   max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        image = image.convert("RGB") if image.mode != "RGB" else image
        image = image.resize((self.resolution, self.resolution), resample=Image.Resampling.BICUBIC)
        arr = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return {"input_ids": input_ids, "pixel_values": torch.from_numpy(arr).permute(2, 0, 1)}

    # a shuffling DataLoader over the items, repeated
    def _batch(self) -> dict[str, torch.Tensor]:
        idx = []
        for _ in range(self.batch_size):
            if not self._order:
                self._order = torch.randperm(len(self.items), generator=self.generator).tolist()
            idx.append(self._order.pop(0))
        examples = [self._example(k) for k in idx]
        return {"input_ids": torch.stack([e["input_ids"] for e in examples]).to(self.device),
                "pixel_values": torch.stack([e["pixel_values"] for e in examples]).to(self.device)}

    def step(self) -> float:
        clock = time.perf_counter
        t0 = clock()
        batch = self._batch()
        g = self.generator
        t1 = clock()
        latents = self.vae.encode(batch["pixel_values"].to(dtype=self.weight_dtype)).latent_dist.sample(generator=g)
        latents = latents.detach() * self.vae.config.scaling_factor
        t2 = clock()
        noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype).to(self.device)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=g)
        timesteps = timesteps.to(self.device).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(batch["input_ids"])[0].to(dtype=self.weight_dtype)
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unknown prediction type {self.noise_scheduler.config.prediction_type}")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        t3 = clock()
        self.optimizer.step()
        self.optimizer.zero_grad()
        t4 = clock()
        # make sure only the new embeddings are updated
        with torch.no_grad():
            weight = self.text_encoder.get_input_embeddings().weight
            weight[self.index_no_updates] = self.orig_embeds_params[self.index_no_updates]
        value = float(loss.detach().item())
        t5 = clock()
        self.losses.append(value)
        for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            self.phase_s[name].append(dt)
        return value

    def train(self, steps: int, progress: Callable[[int], None] | None = None) -> list[float]:
        for s in range(steps):
            self.step()
            if progress is not None:
                progress(s + 1)
        return self.losses


# ------------------------------------------------------------------------------------- timing


def _rate(stamps: list[float]) -> float:
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise ValueError("need at least 2 timed steps")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def time_reference(steps: int, batch: int, *, seed: int = 0) -> dict[str, Any]:
    """Steps/s of the reference loop (steps 2..N) on a fresh pipe."""
    pipe = fresh_pipe()
    ref = ReferenceTI(pipe, make_words(), make_items(), batch_size=batch, seed=seed)
    stamps: list[float] = []
    ref.train(steps, progress=lambda _s: stamps.append(time.perf_counter()))
    parts_ms = {name: 1000 * statistics.fmean(xs[1:]) for name, xs in ref.phase_s.items()}  # steps 2..N
    return {"steps_per_s": _rate(stamps), "final_loss": ref.losses[-1], "parts_ms": parts_ms}


def time_caspec(steps: int, batch: int, work: Path, *, phase: int = 1, seed: int = 0) -> dict[str, Any]:
    """Steps/s of caspec's trainer (steps 2..N, from its progress callback) on a fresh pipe."""
    from caspec.train import train_concept

    pipe = fresh_pipe()
    cfg = TrainConfig(phase1_steps=steps if phase == 1 else 0, phase2_steps=steps if phase == 2 else 0,
                      batch_size=batch, checkpoint_every=0, preview_every=0, seed=seed)
    stamps: list[float] = []
    out = Path(tempfile.mkdtemp(prefix="asset-", dir=work))
    summary = train_concept(pipe, make_words(), make_items(), cfg, out, checkpoint_dir=out.with_name(out.name + "-ckpt"),
                            preview_prompts=[], progress=lambda *_a: stamps.append(time.perf_counter()))
    loop_s = stamps[-1] - stamps[0]
    return {"steps_per_s": _rate(stamps), "final_loss": summary["final_loss"],
            "outside_loop_s": round(summary["seconds"] - loop_s, 3)}


def run_benchmark(steps: int = 100, batches: tuple[int, ...] = (1, 4), repeats: int = 3, warmup: int = 5,
                  phase2: bool = True, log: Callable[[str], None] = lambda _m: None,
                  threads: int | None = None) -> dict[str, Any]:
    """Time both sides at each batch size; returns the machine, the settings and the results.

    ``threads``: ``torch.set_num_threads`` for the run (restored afterwards); None keeps torch's default.
    """
    if steps < 2:
        raise ValueError("steps must be >= 2 (the first step is not timed)")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(steps, batches, repeats, warmup, phase2, log)
    finally:
        torch.set_num_threads(old_threads)


def _run(steps: int, batches: tuple[int, ...], repeats: int, warmup: int, phase2: bool,
         log: Callable[[str], None]) -> dict[str, Any]:
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="caspec-bench-train-"))
    med = statistics.median
    results = []
    try:
        for batch in batches:
            if warmup:
                time_caspec(max(warmup, 2), batch, work)
                time_reference(max(warmup, 2), batch)
            cas, ref = [], []
            for r in range(repeats):
                order = ("caspec", "reference") if r % 2 == 0 else ("reference", "caspec")
                for side in order:
                    if side == "caspec":
                        cas.append(time_caspec(steps, batch, work))
                    else:
                        ref.append(time_reference(steps, batch))
                    log(f"batch {batch} repeat {r + 1}/{repeats} {side}: "
                        f"{(cas if side == 'caspec' else ref)[-1]['steps_per_s']:.2f} steps/s")
            row: dict[str, Any] = {
                "batch": batch,
                "caspec_phase1": [x["steps_per_s"] for x in cas],
                "reference": [x["steps_per_s"] for x in ref],
                "caspec_outside_loop_s": [x["outside_loop_s"] for x in cas],
                "reference_parts_ms": {name: med([x["parts_ms"][name] for x in ref]) for name in PHASES},
                "final_loss": {"caspec": [x["final_loss"] for x in cas], "reference": [x["final_loss"] for x in ref]},
            }
            row["caspec_phase1_median"] = med(row["caspec_phase1"])
            row["reference_median"] = med(row["reference"])
            row["ratio"] = row["caspec_phase1_median"] / row["reference_median"]
            row["paired_ratios"] = [c / f for c, f in zip(row["caspec_phase1"], row["reference"])]
            if phase2:
                if warmup:
                    time_caspec(max(warmup, 2), batch, work, phase=2)
                p2 = [time_caspec(steps, batch, work, phase=2)["steps_per_s"] for _ in range(repeats)]
                row["caspec_phase2"] = p2
                row["caspec_phase2_median"] = med(p2)
                log(f"batch {batch} caspec phase 2: {row['caspec_phase2_median']:.2f} steps/s")
            results.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import diffusers

    return {
        "machine": {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_1_5_15_start": [round(x, 2) for x in load_start],
                    "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"steps": steps, "batches": list(batches), "repeats": repeats, "warmup": warmup,
                     "images": len(make_items()), "resolution": RESOLUTION,
                     "timing": "steps 2..N of each run (per-step timestamps), median over repeats"},
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"machine: {m['machine']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"diffusers {m['diffusers']}, Python {m['python']}; {s['steps']} steps per run, "
             f"median of {s['repeats']}; load average at start/end {m['loadavg_1_5_15_start'][0]:.2f}/"
             f"{m['loadavg_1_5_15_end'][0]:.2f}", "",
             "| batch | caspec phase 1 steps/s | reference steps/s | caspec / reference | caspec phase 2 steps/s |",
             "|---|---|---|---|---|"]
    for r in report["results"]:
        def cell(xs: list[float]) -> str:
            return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"

        p2 = cell(r["caspec_phase2"]) if "caspec_phase2" in r else "—"
        lines.append(f"| {r['batch']} | {cell(r['caspec_phase1'])} | {cell(r['reference'])} | "
                     f"**{r['ratio']:.2f}×** | {p2} |")
    lines += ["", "cells: median (min–max) steps/s over the repeats; ratio = ratio of the medians", "",
              "Where a step's time goes (ms per step, medians):", "",
              "| batch | caspec phase 1 step | reference step | ref: data | ref: VAE encode | "
              "ref: text enc + UNet fwd/bwd | ref: AdamW over table | ref: restore rows |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        p = r["reference_parts_ms"]
        lines.append(f"| {r['batch']} | {1000 / r['caspec_phase1_median']:.1f} | {1000 / r['reference_median']:.1f} | "
                     + " | ".join(f"{p[name]:.1f}" for name in PHASES) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="steps of the untimed warm-up run of each side")
    ap.add_argument("--no-phase2", action="store_true", help="skip timing caspec's phase 2")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    report = run_benchmark(args.steps, tuple(args.batch), args.repeats, args.warmup, not args.no_phase2,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True), threads=args.threads)
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
