"""Training the toy models on the shapes world: the SD-shaped pipeline (VAE, then UNet + text encoder).

``caspec toyworld train`` (and ``make toyworld``) runs :func:`train_toy`.  Everything is deterministic
from one seed on a given machine and stack: the dataset is rendered from the seed, every random draw
comes from seeded generators.  Steps:

1. render ``n_images`` scenes of :mod:`caspec.toyworld.data` (any rotation for the VAE, upright for the rest);
2. train the AutoencoderKL (MSE + a small KL term) and encode every upright image once (latent means), then set
   the VAE's ``scaling_factor`` to 1/std of those latents, as Stable Diffusion does;
3. train the UNet and the CLIP text encoder together from scratch on the cached latents with the
   epsilon objective, min-SNR weighting, captions with random parts dropped (empty 10% of the time, for
   classifier-free guidance), and an exponential moving average of the weights, which is what is saved.

Weights are written as fp16 safetensors plus ``toy.json`` (settings, losses, timings) into ``out``.
Logs: one JSON line per logged step in ``out/train-log.jsonl`` and a short line on stderr.
The CLIP for metrics is trained by :mod:`caspec.toyworld.train_clip`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..fsutil import atomic_write_bytes, atomic_write_text
from .data import render_dataset, training_caption


@dataclass
class ToyTrainConfig:
    seed: int = 20261128
    n_images: int = 24000
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    warmup: int = 200
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    log_every: int = 50
    save_every: int = 0  # also write the EMA weights so far to out/step-<n>/ (inspect a run in progress)
    threads: int = 0  # 0: torch's default
    vae_init: str = ""  # reuse vae.safetensors from an earlier run with the same seed and VAE settings
    init_from: str = ""  # start UNet + text encoder from this weights folder (a second, fine-tuning stage)


def warmup_cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """The learning rate at ``step``: linear warm-up, then cosine down to a tenth of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class TrainLog:
    """A training log: each line to a file and, optionally, to ``echo``."""
    def __init__(self, path: Path | None, echo: Callable[[str], None] | None):
        self.fh = open(path, "w", encoding="utf-8") if path else None
        self.echo = echo
        self.t0 = time.perf_counter()

    def __call__(self, **rec: Any) -> None:
        rec["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        if self.fh:
            self.fh.write(json.dumps(rec) + "\n")
            self.fh.flush()
        if self.echo:
            self.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    def close(self):
        if self.fh:
            self.fh.close()


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(images, cfg: ToyTrainConfig, log: TrainLog):
    """Train the toy AutoencoderKL on ``images`` (a float tensor in [-1, 1]); returns the model."""
    import torch
    from diffusers import AutoencoderKL

    from ..models.toy import VAE_CONFIG

    torch.manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    vae.train()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        idx = torch.randint(0, images.shape[0], (cfg.vae_batch,), generator=gen)
        x = images[idx]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = dist.kl().mean() / x[0].numel()
        loss = mse + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log(phase="vae", step=step, mse=float(mse), kl=float(kl))
    vae.eval()
    return vae


def _load_vae(path: Path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from ..models.toy import VAE_CONFIG

    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return vae.eval()


def encode_all(vae, images, batch: int = 256):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            out.append(vae.encode(images[i:i + batch]).latent_dist.mean)
    return torch.cat(out)


def _tokenize_cached(tokenizer, cache: dict[str, Any], texts: list[str]):
    import torch

    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        for t, row in zip(missing, ids):
            cache[t] = row
    return torch.stack([cache[t] for t in texts])


def train_diffusion(latents, scenes, tokenizer, cfg: ToyTrainConfig, log: TrainLog,
                    snapshot: Callable[[int, Any, Any], None] | None = None):
    """Train UNet + text encoder on cached (already scaled) latents; returns EMA copies of both."""
    import copy

    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.toy import TEXT_CONFIG, UNET_CONFIG, scheduler_config

    torch.manual_seed(cfg.seed + 3)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(cfg.seed + 4)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    if cfg.init_from:
        from safetensors.torch import load_file

        for module, name in ((unet, "unet"), (text, "text_encoder")):
            state = load_file(str(Path(cfg.init_from) / f"{name}.safetensors"))
            module.load_state_dict({k: v.float() for k, v in state.items()})
        log(phase="unet", init_from=str(cfg.init_from))
    sched = DDIMScheduler(**scheduler_config())
    acp = sched.alphas_cumprod.float()
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR for epsilon prediction

    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    for p in ema_params:
        p.requires_grad_(False)

    gen = torch.Generator().manual_seed(cfg.seed + 5)
    cap_rng = np.random.default_rng(cfg.seed + 6)
    tok_cache: dict[str, Any] = {}
    unet.train()
    text.train()
    n = latents.shape[0]
    for step in range(cfg.unet_steps):
        lr = warmup_cosine_lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        ids = _tokenize_cached(tokenizer, tok_cache, [training_caption(scenes[i], cap_rng) for i in idx.tolist()])
        # timesteps with density rising linearly in t: more of the low-SNR steps where layout forms
        u = torch.rand(cfg.unet_batch, generator=gen)
        t = (u.sqrt() * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        hidden = text(ids)[0]
        pred = unet(xt, t, hidden).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p.detach(), 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            log(phase="unet", step=step, loss=float(loss), mse=float(per.mean()), lr=lr)
        if snapshot and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.unet_steps:
            snapshot(step + 1, ema_unet, ema_text)
    return ema_unet, ema_text


def _save(path: Path, module, meta: dict[str, str] | None = None) -> None:
    import torch

    from ..assets.format import safetensors_bytes

    state = {k: v.detach().to(torch.float16) for k, v in module.state_dict().items()}
    atomic_write_bytes(path, safetensors_bytes(state, meta))


def train_toy(out: Path, cfg: ToyTrainConfig | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the toy pipeline into ``out`` (unet/vae/text_encoder .safetensors + toy.json); return toy.json."""
    import torch

    from ..models.tiny import TOKENIZER_MAX_LENGTH, clip_vocab

    cfg = cfg or ToyTrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = TrainLog(out / "train-log.jsonl", echo)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        scenes, arr = render_dataset(cfg.n_images, cfg.seed, upright=True)
        images = _to_tensor(arr)
        timings["render_s"] = time.perf_counter() - t0
        log(phase="data", images=len(scenes))

        t0 = time.perf_counter()
        if cfg.vae_init:
            vae = _load_vae(Path(cfg.vae_init))
            log(phase="vae", reused=str(cfg.vae_init))
        else:  # the VAE learns the wider world: any rotation
            vae = train_vae(_to_tensor(render_dataset(cfg.n_images, cfg.seed, upright=False)[1]), cfg, log)
        timings["vae_s"] = time.perf_counter() - t0
        _save(out / "vae.safetensors", vae)
        with torch.no_grad():
            lat = encode_all(vae, images)
        scaling = float(1.0 / lat.std())
        if cfg.init_from:  # keep the latent scale the first stage's UNet learned with
            scaling = float(json.loads((Path(cfg.init_from) / "toy.json").read_text())["vae_scaling_factor"])
        with torch.no_grad():
            k = min(512, lat.shape[0])
            recon = torch.cat([vae.decode(lat[i:i + 256]).sample for i in range(0, k, 256)])
            vae_mse = float(torch.nn.functional.mse_loss(recon, images[:k]))
        log(phase="latents", scaling_factor=scaling, recon_mse=vae_mse)

        from transformers import CLIPTokenizer

        vocab, merges = clip_vocab()
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)
        t0 = time.perf_counter()
        def snapshot(step: int, unet, text) -> None:
            import shutil

            folder = out / f"step-{step}"
            folder.mkdir(exist_ok=True)
            shutil.copyfile(out / "vae.safetensors", folder / "vae.safetensors")
            _save(folder / "unet.safetensors", unet)
            _save(folder / "text_encoder.safetensors", text)
            atomic_write_text(folder / "toy.json", json.dumps({"vae_scaling_factor": scaling, "step": step}) + "\n")

        unet, text = train_diffusion(lat * scaling, scenes, tokenizer, cfg, log, snapshot)
        timings["unet_s"] = time.perf_counter() - t0

        _save(out / "unet.safetensors", unet)
        _save(out / "text_encoder.safetensors", text)
        meta = {
            "vae_scaling_factor": scaling,
            "vae_recon_mse": vae_mse,
            "config": asdict(cfg),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        atomic_write_text(out / "toy.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return meta
    finally:
        log.close()


def main(argv: list[str] | None = None) -> int:  # python -m caspec.toyworld.train OUT [key=value ...]
    args = sys.argv[1:] if argv is None else argv
    cfg = ToyTrainConfig()
    for kv in args[1:]:
        k, v = kv.split("=", 1)
        setattr(cfg, k, type(getattr(cfg, k))(v))
    train_toy(Path(args[0]), cfg, echo=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
