"""Training the toy CLIP (open_clip architecture ``caspec-toy-clip``) contrastively on the shapes world.

The same scenes and caption words as the toy diffusion model (:mod:`caspec.toyworld.data`), with parts
of each caption dropped at random so that short texts ("a blue star") embed near matching images.  Many
captions repeat within a batch, so the contrastive targets treat every pair with the *same* caption as
a positive (spread evenly), not only the diagonal.  Images go through open_clip's own preprocessing, as
they do when caspec later measures with the model.  Deterministic from the seed.  The state dict is
saved as fp16 safetensors (``clip.safetensors``), loadable with ``open_clip.load_checkpoint``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..fsutil import atomic_write_bytes, atomic_write_text
from .data import render_dataset, training_caption
from .train import TrainLog, warmup_cosine_lr

TOY_CLIP = "caspec-toy-clip"


@dataclass
class ToyClipConfig:
    seed: int = 20261129
    n_images: int = 16000
    steps: int = 800
    batch: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 100
    log_every: int = 50


def train_clip(out: Path, cfg: ToyClipConfig | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the toy CLIP into ``out/clip.safetensors`` (+ ``clip.json``); returns the metadata."""
    import torch
    from PIL import Image

    from ..assets.format import safetensors_bytes
    from ..metrics.clip import register_configs

    cfg = cfg or ToyClipConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    oc = register_configs()
    log = TrainLog(out / "clip-log.jsonl", echo)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model, _, preprocess = oc.create_model_and_transforms(TOY_CLIP, pretrained=None, pretrained_text=False)
        tokenizer = oc.get_tokenizer(TOY_CLIP)
        scenes, arr = render_dataset(cfg.n_images, cfg.seed)
        pixels = torch.stack([preprocess(Image.fromarray(a)) for a in arr])
        log(phase="clip-data", images=len(scenes))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        rng = np.random.default_rng(cfg.seed + 2)
        cache: dict[str, Any] = {}
        model.train()
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
            idx = torch.randint(0, len(scenes), (cfg.batch,), generator=gen).tolist()
            texts = []
            for i in idx:
                t = training_caption(scenes[i], rng)
                while not t:
                    t = training_caption(scenes[i], rng)
                texts.append(t)
            for t in set(texts) - cache.keys():
                cache[t] = tokenizer([t])[0]
            tokens = torch.stack([cache[t] for t in texts])
            img = model.encode_image(pixels[idx], normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            logits = model.logit_scale.exp() * img @ txt.T
            same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
            target = same / same.sum(1, keepdim=True)
            loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                          - (target * logits.T.log_softmax(1)).sum(1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                log(phase="clip", step=step, loss=float(loss), logit_scale=float(model.logit_scale.exp()))
        model.eval()
        state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
        atomic_write_bytes(out / "clip.safetensors", safetensors_bytes(state))
        meta = {"config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1), "final_loss": float(loss)}
        atomic_write_text(out / "clip.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return meta
    finally:
        log.close()
