"""Two-phase concept training (paper, section 3.4): multi-token textual inversion, then jointly with LoRA.

``train_concept(pipe, words, items, cfg, out_dir, checkpoint_dir=...)`` learns one embedding row per
pseudo-word from (image k, caption k) pairs — image k is always paired with its own caption, e.g.
``<dance1> <robot3>`` — by minimising the diffusion loss of eq. (5):
``|| target - unet(z_t^k, t, text_encoder(caption_k)) ||²`` with ``z_t^k = add_noise(z0^k, ε, t)``,
``t ~ U[0, num_train_timesteps)`` (or, with ``timestep_sampling: cubic``, ``t = (1 - u³) T``: more
high-noise steps, where the layout is decided), target ``ε`` (or ``v`` for v-prediction models),
optionally min-SNR weighted.

* Phase 1 (``phase1_steps``) trains only the new embedding rows (AdamW, ``lr_embeddings``).
* Phase 2 (``phase2_steps``) injects LoRA (peft, ``init_lora_weights="gaussian"``: B = 0, so the
  adapters start as a no-op) into the text encoder and UNet, and trains embeddings + both LoRAs
  with a fresh AdamW (three parameter groups with their own learning rates). Base weights stay frozen.

Only the new rows change: they live in a separate fp32 ``nn.Parameter`` [n_new, d] that a forward
hook on the token-embedding layer splices into its output wherever a new id occurs. The embedding
table itself is never written during training (so weight decay cannot touch other rows); at the
end the learned rows are written into it and the hook is removed.

Determinism: everything random in step ``s`` (data order, flips, timesteps, noise, and the global
RNG for anything else, e.g. dropout) comes from generators seeded with
``derive_seed(cfg.seed, purpose, s)``, and the LoRA initialisation from ``derive_seed(cfg.seed,
"lora-init", component)``. A run resumed from a checkpoint therefore continues exactly the sequence
an uninterrupted run takes: same seed and inputs give bit-identical assets on the same machine.
The caller's global RNG state is left untouched.

Checkpoints (``checkpoint_dir/checkpoint.pt``, every ``checkpoint_every`` optimizer steps, written
atomically) hold the new embeddings, LoRA weights, optimizer and GradScaler state, the step, phase,
loss log and a fingerprint of everything that decides the result; a checkpoint that is unreadable,
incomplete or from other inputs is ignored (training restarts from step 0).

The pipe is modified in place (tokens, rows, LoRA adapters): pass one from
``load_pipeline(..., fresh=True)``, never the shared cached one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ..assets import format as fmt
from ..models.text import encode_ids
from ..ops.seeds import derive_seed
from .config import NON_NUMERIC_SETTINGS, PseudoWord, TrainConfig, keyed_settings

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "caspec-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: new embeddings per text encoder (SDXL), multi-vector words
TRAINER_VERSION = 1  # bump when the training numerics change (enters the checkpoint fingerprint)
PREVIEW_STEPS = 20
PREVIEW_GUIDANCE = 7.5
DEFAULT_PREVIEWS = 4
LOSS_WINDOW = 20  # initial/final loss = mean of the first/last (up to) this many steps

Progress = Callable[[int, int, dict], None]


def train_concept(
    pipe: Any,
    words: list[PseudoWord],
    items: list[tuple[Image.Image, str]],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    checkpoint_dir: str | Path,
    preview_prompts: list[str] | None = None,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the pseudo-words (and LoRA) on ``items`` and write the asset into ``out_dir``.

    ``items``: (image, caption) pairs; every caption should contain its pseudo-words.
    ``progress(step, total, {"loss", "phase", "lr"})`` is called after every optimizer step.
    ``stop_after``: test hook, raise ``KeyboardInterrupt`` after that many optimizer steps of this call.

    Returns a summary: ``initial_loss`` / ``final_loss`` (mean of the first / last up to 20 steps),
    ``steps`` (total optimizer steps), ``steps_run`` (in this call), ``resumed_from`` (the step a
    checkpoint restored, or None), ``seconds`` (this call), ``tokens``.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    trainer = _Trainer(pipe, list(words), list(items), cfg, Path(out_dir), Path(checkpoint_dir),
                       preview_prompts, progress, stop_after)
    return trainer.run()


# ---------------------------------------------------------------------------------------------


def background(image: Image.Image) -> tuple[int, ...]:
    """The image's background colour: the most common colour of its border pixels."""
    import numpy as np

    a = np.asarray(image.convert("RGB"))
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    colours, counts = np.unique(border.reshape(-1, 3), axis=0, return_counts=True)
    return tuple(int(c) for c in colours[counts.argmax()])


def shifted(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """``image`` translated by ``(dx, dy)`` pixels, the uncovered border filled with its background colour."""
    rgb = image.convert("RGB")
    out = Image.new("RGB", rgb.size, background(rgb))
    out.paste(rgb, (int(dx), int(dy)))
    return out


def _check_inputs(pipe: Any, words: list[PseudoWord], items: list[tuple[Image.Image, str]], cfg: TrainConfig,
                  preview_prompts: list[str] | None, stop_after: int | None) -> None:
    from ..models import load as model_load

    if any(pipe is shared for shared in list(model_load._PIPES.values())):
        raise ValueError("train_concept changes the pipe it trains: pass one loaded with "
                         "load_pipeline(..., fresh=True), not the shared cached pipe")
    if not words:
        raise ValueError("no pseudo-words to train")
    for w in words:
        if not isinstance(w, PseudoWord):
            raise ValueError(f"words must be PseudoWord objects, got {type(w).__name__}")
    tokens = [w.token for w in words]
    dup = sorted({t for t in tokens if tokens.count(t) > 1})
    if dup:
        raise ValueError(f"pseudo-word(s) listed twice: {', '.join(dup)}")
    if not items:
        raise ValueError("no training images")
    for k, item in enumerate(items, 1):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"training item {k} must be an (image, caption) pair")
        image, caption = item
        if not isinstance(image, Image.Image):
            raise ValueError(f"training item {k}: the image must be a PIL image, got {type(image).__name__}")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"training item {k}: the caption must be a non-empty string")
    for w in words:
        if not any(w.token in caption for _, caption in items):
            raise ValueError(f"pseudo-word {w.token} appears in no caption, so it cannot be learned; "
                             f"captions: {' | '.join(c for _, c in items)}")
    if preview_prompts is not None and (not isinstance(preview_prompts, (list, tuple))
                                        or not all(isinstance(p, str) for p in preview_prompts)):
        raise ValueError("preview_prompts must be a list of strings")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive integer, got {stop_after!r}")
    if cfg.shift_px:
        from .config import place_words

        found = place_words([w.init_word for w in words] + [c for _, c in items])
        if found:
            raise ValueError(f"shift_px (position augmentation) moves the object, but this asset is about place "
                             f"(`{'`, `'.join(found)}` in its words or captions): leave shift_px at 0")
    if cfg.mixed_precision == "fp16" and pipe.device.type != "cuda":
        raise ValueError("mixed_precision fp16 needs a CUDA device; on the CPU use `no` or `bf16`")
    if cfg.phase2_steps > 0:
        for comp, module in pipe.trained_lora_modules(cfg):
            fmt.check_targets(module, pipe.kind.lora_targets(comp, cfg), f"the {comp.replace('_', ' ')}")
    _check_lengths(pipe, words, [c for _, c in items], preview_prompts)


def _check_lengths(pipe: Any, words: list[PseudoWord], captions: list[str], preview_prompts: list[str] | None) -> None:
    """Every caption and preview prompt fits the text encoder's window (``PromptTooLong``, a ValueError):
    a cut caption would train without the pseudo-words it loses. A multi-vector word counts as its vectors."""
    from ..models.prompts import check_prompt
    from ..models.text import expand_text, sub_tokens

    expansions = {w.token: sub_tokens(w.token, w.vectors) for w in words}
    tokens = [t for subs in expansions.values() for t in subs]
    for k, caption in enumerate(captions, 1):
        check_prompt(pipe.tokenizer, expand_text(caption, expansions), what=f"caption {k} ({caption[:40]}...)"
                     if len(caption) > 40 else f"caption {k}", pseudo_words=tokens, text_encoder=pipe.text_encoder)
    for i, prompt in enumerate(preview_prompts or []):
        check_prompt(pipe.tokenizer, expand_text(prompt, expansions), what=f"preview prompt {i + 1}",
                     pseudo_words=tokens, text_encoder=pipe.text_encoder)


def _training_resolution(pipe: Any, images: list[Image.Image]) -> int:
    """The images' own size when they are all the same square size (a multiple of the VAE factor),
    else the model's native size (images are then centre-cropped and resized)."""
    sizes = {im.size for im in images}
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        if w == h and w % pipe.vae_scale_factor == 0 and w >= pipe.vae_scale_factor * 2:
            return int(w)
    return int(pipe.resolution)


class _Trainer:
    def __init__(self, pipe: Any, words: list[PseudoWord], items: list[tuple[Image.Image, str]], cfg: TrainConfig,
                 out_dir: Path, checkpoint_dir: Path, preview_prompts: list[str] | None,
                 progress: Progress | None, stop_after: int | None) -> None:
        _check_inputs(pipe, words, items, cfg, preview_prompts, stop_after)
        self.pipe, self.words, self.items, self.cfg = pipe, words, items, cfg
        self.out_dir, self.checkpoint_dir = out_dir, checkpoint_dir
        self.progress, self.stop_after = progress, stop_after
        captions = [c for _, c in items]
        self.preview_prompts = (list(preview_prompts) if preview_prompts is not None
                                else list(dict.fromkeys(captions))[:DEFAULT_PREVIEWS])
        self.adapter = fmt.adapter_name_for(out_dir.name or "asset")
        self.device = pipe.device
        self.total = cfg.total_steps
        self.resolution = _training_resolution(pipe, [im for im, _ in items])
        self.fingerprint = self._fingerprint()
        self.hooks: list[Any] = []
        self.lora_on = False
        self.log_records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up

    def _fingerprint(self) -> str:
        from ..ops.images import pixel_digest

        settings = keyed_settings({k: v for k, v in self.cfg.to_dict().items() if k not in NON_NUMERIC_SETTINGS})
        payload = {
            "trainer": TRAINER_VERSION,
            "settings": settings,
            "words": [[w.token, w.init_word, w.role] + ([w.vectors] if w.vectors != 1 else []) for w in self.words],
            "items": [[pixel_digest(im), cap] for im, cap in self.items],
            "resolution": self.resolution,
            "model": getattr(self.pipe, "identity", {}),
            "device": self.device.type,
            "dtype": str(self.pipe.dtype),
            "torch": torch.__version__,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _setup_model(self) -> None:
        pipe, cfg = self.pipe, self.cfg
        for module in (*(te for _, _, te in pipe.text_encoders), pipe.denoiser, pipe.vae):
            module.requires_grad_(False)
        self.tokens = [w.token for w in self.words]
        vectors = {w.token: w.vectors for w in self.words}
        init_word = {w.token: w.init_word for w in self.words}
        # per text encoder: the init rows of every (sub-)token, then the new ids (SDXL: both encoders)
        inits = {comp: [fmt.first_token_id(tok, init_word[w], token=w) for w in self.tokens for _ in range(vectors[w])]
                 for comp, tok, _ in pipe.text_encoders}
        self.new_ids = fmt.add_pseudo_words(pipe, vectors)
        self.new_embs: dict[str, torch.nn.Parameter] = {}
        self.luts: dict[str, torch.Tensor] = {}
        self.hooks = []
        for comp, _, te in pipe.text_encoders:
            emb_layer = te.get_input_embeddings()
            weight = emb_layer.weight
            with torch.no_grad():
                init_rows = weight[torch.tensor(inits[comp], device=weight.device)].detach().clone()
                weight[torch.tensor(self.new_ids[comp], device=weight.device)] = init_rows  # for anyone reading it
            self.new_embs[comp] = torch.nn.Parameter(init_rows.float().clone())
            lut = torch.full((weight.shape[0],), -1, dtype=torch.long)
            lut[torch.tensor(self.new_ids[comp])] = torch.arange(len(self.new_ids[comp]))
            self.luts[comp] = lut.to(weight.device)
            # every module that looks rows up in this table: T5EncoderModel's forward uses `encoder.embed_tokens`,
            # which shares the weight of `shared` (get_input_embeddings) but is another module
            for layer in te.modules():
                if isinstance(layer, torch.nn.Embedding) and layer.weight is weight:
                    self.hooks.append(layer.register_forward_hook(self._splicer(comp)))

        # captions -> ids per encoder (their length was checked: nothing is cut), each pseudo-word one token
        from ..models.text import expand_prompt, tokenize

        captions = [expand_prompt(pipe, c) for _, c in self.items]
        self.caption_ids = [(ids.to(self.device), None if mask is None else mask.to(self.device))
                            for ids, mask in tokenize(pipe, captions)]
        present = set(self.caption_ids[0][0].flatten().tolist())
        for w in self.words:
            i = self.new_ids["text_encoder"][self._offset(w.token)]
            if i not in present:
                raise ValueError(f"pseudo-word {w.token} is lost when the captions are tokenized "
                                 f"(the token glued to other text?)")

        self.schedule = pipe.kind.training_schedule(pipe)

        self.latent_cache: dict[tuple[int, bool], torch.Tensor] = {}
        if cfg.cache_latents:
            for k in range(len(self.items)):
                self._latent(k, False)

        if cfg.gradient_checkpointing:
            pipe.denoiser.enable_gradient_checkpointing()
            for _, _, te in pipe.text_encoders:
                enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
                enable()

        use_cuda = self.device.type == "cuda"
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        needs_scaler = use_cuda and (cfg.mixed_precision == "fp16" or pipe.dtype == torch.float16)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    def _splicer(self, comp: str) -> Callable[..., torch.Tensor]:
        """A forward hook on ``comp``'s token-embedding layer that puts the trained rows in place of the table's."""
        def splice(_module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
            sel = self.luts[comp][args[0]]
            mask = (sel >= 0).unsqueeze(-1)
            rows = self.new_embs[comp][sel.clamp(min=0)].to(output.dtype)
            return torch.where(mask, rows, output)

        return splice

    def _offset(self, token: str) -> int:
        """Where ``token``'s first row sits among the new rows."""
        n = 0
        for w in self.words:
            if w.token == token:
                return n
            n += w.vectors
        raise KeyError(token)

    def _latent(self, k: int, flipped: bool, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
        key = (k, flipped, *shift) if any(shift) else (k, flipped)
        z = self.latent_cache.get(key)
        if z is None:
            image = self.items[k][0]
            if flipped:
                image = image.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if any(shift):
                image = shifted(image, *shift)
            z = self.pipe.kind.sampler.encode_image(self.pipe, image, self.resolution).clone()  # out of inference mode
            if self.cfg.cache_latents:
                self.latent_cache[key] = z
        return z

    def _inject_lora(self) -> None:
        cfg = self.cfg
        for comp, module in self.pipe.trained_lora_modules(cfg):
            targets = self.pipe.kind.lora_targets(comp, cfg)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(cfg.seed, "lora-init", comp))
                fmt.inject_lora(module, fmt.lora_config(cfg.lora_rank, cfg.lora_alpha, targets), self.adapter,
                                trainable=True)
            self._lora_to_fp32(module)
        self.lora_on = True

    def _lora_to_fp32(self, module: Any) -> None:
        """Adapters train in fp32 whatever the base dtype. peft makes them in the base layer's dtype, so they
        are cast right after injection: before a checkpoint's fp32 weights are loaded into them (loading
        into bf16/fp16 adapters would round them, and a resumed run would drift from a straight one)."""
        for p in self._lora_params(module):
            p.data = p.data.float()

    def _lora_params(self, module: Any) -> list[torch.nn.Parameter]:
        tag = f".{self.adapter}."
        return [p for n, p in module.named_parameters() if tag in n and "lora_" in n]

    def _optimizer(self, phase: int) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = [{"params": list(self.new_embs.values()), "lr": cfg.lr_embeddings}]
        if phase == 2 and not cfg.phase2_embeddings:
            groups = []
        if phase == 2:
            unet_p = self._lora_params(self.pipe.denoiser)
            text_p = [p for comp, m in self.pipe.trained_lora_modules(cfg) if comp != self.pipe.kind.denoiser
                      for p in self._lora_params(m)]
            if not unet_p or not text_p:
                raise RuntimeError("LoRA injection produced no trainable parameters")
            groups += [{"params": unet_p, "lr": cfg.lr_lora_unet}, {"params": text_p, "lr": cfg.lr_lora_text}]
        return torch.optim.AdamW(groups, lr=cfg.lr_embeddings, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ data

    def _sample_index(self, pos: int) -> int:
        n = len(self.items)
        epoch, offset = divmod(pos, n)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "order", epoch))
            perm = torch.randperm(n, generator=g).tolist()
            self._perms = {epoch: perm}  # positions only move forward: keep one epoch
        return perm[offset]

    # ------------------------------------------------------------------ one step

    def _step(self, s: int, opt: torch.optim.Optimizer) -> float:
        cfg, pipe = self.cfg, self.pipe
        bs, ga = cfg.batch_size, cfg.grad_accum
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "step", s))
        torch.manual_seed(derive_seed(cfg.seed, "global", s))  # anything else random (dropout, ...)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(derive_seed(cfg.seed, "global", s))
        total = 0.0
        for a in range(ga):
            base = (s * ga + a) * bs
            idx = [self._sample_index(base + j) for j in range(bs)]
            flips = (torch.rand(bs, generator=g) < 0.5).tolist() if cfg.flip else [False] * bs
            shifts = [(0, 0)] * bs
            if cfg.shift_px and (cfg.shift_phases == "both" or s >= cfg.phase1_steps):
                d = torch.randint(-cfg.shift_px, cfg.shift_px + 1, (bs, 2), generator=g).tolist()
                shifts = [(int(dx), int(dy)) for dx, dy in d]
            z0 = torch.cat([self._latent(k, f, sh) for k, f, sh in zip(idx, flips, shifts)]).to(self.device,
                                                                                                 torch.float32)
            noise = torch.randn(z0.shape, generator=g, dtype=torch.float32).to(self.device)
            t = self.schedule.timesteps(bs, g, self.cfg.timestep_sampling).to(self.device)
            z_t, target = self.schedule.noisy(z0, noise, t)
            ids = [(i[idx], None if m is None else m[idx]) for i, m in self.caption_ids]
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                cond = encode_ids(pipe, ids).to(pipe.dtype)
                pred = pipe.kind.predict(pipe, z_t, t, cond, self.resolution)
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
            weights = self.schedule.loss_weights(t, cfg.min_snr_gamma)
            if weights is not None:
                per = per * weights
            loss = per.mean()
            scaled = loss / ga
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
            total += float(loss.detach().item())
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        for param in self.new_embs.values():
            param.grad = None  # not in the optimizer when phase 2 trains LoRA only
        return total / ga

    # ------------------------------------------------------------------ checkpoints

    @property
    def ckpt_path(self) -> Path:
        return self.checkpoint_dir / CHECKPOINT_FILE

    def _save_checkpoint(self, done: int, phase: int, opt: torch.optim.Optimizer) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "step": done,
            "phase": phase,
            "tokens": list(self.tokens),
            "new_embeddings": {comp: p.detach().to("cpu").clone() for comp, p in self.new_embs.items()},
            "lora": ({comp: {k: v.detach().to("cpu").clone() for k, v in fmt.lora_state_dict(m, self.adapter).items()}
                      for comp, m in self.pipe.trained_lora_modules(self.cfg)}
                     if self.lora_on else None),
            "optimizer": opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "log": list(self.log_records),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        fmt.atomic_write_bytes(self.ckpt_path, buf.getvalue())

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None (absent, unreadable, incomplete, or from other inputs)."""
        path = self.ckpt_path
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: start over
            self._warn(f"ignoring the unreadable checkpoint {path} ({type(exc).__name__}); training restarts")
            return None
        problem = self._checkpoint_problem(state)
        if problem:
            self._warn(f"ignoring the checkpoint {path}: {problem}; training restarts")
            return None
        return state

    def _checkpoint_problem(self, state: Any) -> str | None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            return "not a caspec training checkpoint"
        if state.get("version") != CHECKPOINT_VERSION:
            return f"checkpoint version {state.get('version')} (expected {CHECKPOINT_VERSION})"
        if state.get("fingerprint") != self.fingerprint:
            return "it was made from other inputs or settings"
        step, phase = state.get("step"), state.get("phase")
        if not isinstance(step, int) or not 0 < step <= self.total or phase not in (1, 2):
            return f"bad step/phase ({step}, {phase})"
        emb = state.get("new_embeddings")
        if not isinstance(emb, dict) or set(emb) != set(self.new_embs) or any(
                not isinstance(emb[c], torch.Tensor) or tuple(emb[c].shape) != tuple(p.shape)
                for c, p in self.new_embs.items()):
            return "the embeddings do not fit"
        if phase == 2 and not isinstance(state.get("lora"), dict):
            return "phase-2 checkpoint without LoRA weights"
        log_records = state.get("log")
        if not isinstance(log_records, list) or len(log_records) != step:
            return "the loss log does not match the step"
        if not isinstance(state.get("optimizer"), dict):
            return "no optimizer state"
        return None

    @staticmethod
    def _warn(message: str) -> None:
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ previews

    def _previews(self, done: int) -> None:
        from ..ops.images import save_png

        if not self.preview_prompts:
            return
        folder = self.out_dir / fmt.PREVIEWS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        seeds = [derive_seed(self.cfg.seed, "preview", i) for i in range(len(self.preview_prompts))]
        was_training = self.pipe.denoiser.training
        self._set_train(False)
        try:
            with torch.random.fork_rng(devices=[]):
                images = self.pipe.kind.txt2img(self.pipe, self.preview_prompts, seeds, steps=PREVIEW_STEPS,
                                 guidance_scale=PREVIEW_GUIDANCE, resolution=self.resolution)
        finally:
            self._set_train(was_training)
        for i, (img, prompt, seed) in enumerate(zip(images, self.preview_prompts, seeds)):
            path = folder / f"step-{done:06d}-{i}.png"
            tmp = folder / f".{path.name}.tmp"
            save_png(tmp, img, {"prompt": prompt, "seed": seed, "step": done, "steps": PREVIEW_STEPS,
                                "guidance_scale": PREVIEW_GUIDANCE})
            tmp.replace(path)

    def _set_train(self, on: bool) -> None:
        for _, module in self.pipe.lora_modules:
            module.train(on)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._perms: dict[int, list[int]] = {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                self._setup_model()
                resumed_from, steps_run = self._loop()
            except BaseException:
                self._teardown()
                raise
            self._teardown()
            window = self._window()
            self._write_asset()
            self._previews(self.total)
        losses = [r["loss"] for r in self.log_records]
        w = min(LOSS_WINDOW, len(losses))
        return {
            **({"lora_window": window} if window is not None else {}),
            "initial_loss": sum(losses[:w]) / w if w else None,
            "final_loss": sum(losses[-w:]) / w if w else None,
            "loss_window": w,
            "steps": self.total,
            "phase1_steps": self.cfg.phase1_steps,
            "phase2_steps": self.cfg.phase2_steps,
            "steps_run": steps_run,
            "resumed_from": resumed_from,
            "seconds": round(time.monotonic() - t0, 3),
            "tokens": list(self.tokens),
        }

    def _loop(self) -> tuple[int | None, int]:
        cfg = self.cfg
        p1 = cfg.phase1_steps
        state = self._read_checkpoint()
        start, resumed_from = 0, None
        opt: torch.optim.Optimizer | None = None
        opt_phase = 0
        if state is not None:
            start = resumed_from = int(state["step"])
            with torch.no_grad():
                for comp, param in self.new_embs.items():
                    param.copy_(state["new_embeddings"][comp].to(param.device, param.dtype))
            self.log_records = list(state["log"])
            if state["phase"] == 2:
                self._inject_lora()
                for comp, module in self.pipe.trained_lora_modules(cfg):
                    device = next(module.parameters()).device
                    fmt.load_lora_state(module, {k: v.to(device) for k, v in state["lora"][comp].items()}, self.adapter)
            if start < self.total and (1 if start < p1 else 2) == state["phase"]:
                opt = self._optimizer(state["phase"])
                opt.load_state_dict(state["optimizer"])
                opt_phase = state["phase"]
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        self._set_train(True)
        steps_run = 0
        for s in range(start, self.total):
            phase = 1 if s < p1 else 2
            if phase == 2 and not self.lora_on:
                self._inject_lora()
            if opt is None or opt_phase != phase:
                opt, opt_phase = self._optimizer(phase), phase
            loss = self._step(s, opt)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} at step {s + 1}: lower the learning rates "
                                         "or use mixed_precision `no`")
            done = s + 1
            record: dict[str, Any] = {"step": done, "phase": phase, "loss": loss, "lr": cfg.lr_embeddings}
            if phase == 2:
                record.update(lr_lora_unet=cfg.lr_lora_unet, lr_lora_text=cfg.lr_lora_text)
            self.log_records.append(record)
            steps_run += 1
            if self.progress is not None:
                self.progress(done, self.total, {"loss": loss, "phase": phase, "lr": cfg.lr_embeddings})
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                self._save_checkpoint(done, phase, opt)
                fmt.write_loss_log(self.out_dir, self.log_records)
            if cfg.preview_every and done % cfg.preview_every == 0 and done < self.total:
                self._previews(done)
            if self.stop_after is not None and steps_run >= self.stop_after and done < self.total:
                raise KeyboardInterrupt(f"stop_after={self.stop_after} (test hook)")
        return resumed_from, steps_run

    def _teardown(self) -> None:
        """Leave the pipe usable on its own: learned rows in the table, no hook, eval mode, no grads."""
        for hook in getattr(self, "hooks", []):
            hook.remove()
        if getattr(self, "hooks", None):
            self.hooks = []
            for comp, _, te in self.pipe.text_encoders:
                weight = te.get_input_embeddings().weight
                with torch.no_grad():
                    weight[torch.tensor(self.new_ids[comp], device=weight.device)] = \
                        self.new_embs[comp].detach().to(weight.device, weight.dtype)
        if self.cfg.gradient_checkpointing:
            self.pipe.denoiser.disable_gradient_checkpointing()
            for _, _, te in self.pipe.text_encoders:
                disable = getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable
                disable()
        self._set_train(False)
        for _, module in self.pipe.lora_modules:
            for p in module.parameters():
                p.requires_grad_(False)
                p.grad = None

    def _window(self) -> dict[str, Any] | None:
        """The asset's LoRA window for its card: as set, or measured (``auto``, :mod:`caspec.train.window`)."""
        w = self.cfg.lora_window
        if w is None:
            return None
        if w != "auto":
            return {"window": [float(w[0]), float(w[1])], "how": "set"}
        if not self.lora_on:
            return {"window": None, "how": "auto", "effect": "no window: the asset has no LoRA"}
        from ..models.text import encode_ids
        from .window import measure

        latents = torch.cat([self._latent(k, False) for k in range(len(self.items))]).to(self.device, torch.float32)
        with torch.no_grad():
            cond = encode_ids(self.pipe, self.caption_ids).to(self.pipe.dtype)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "window", 0))
        return measure(self.pipe, self.schedule, latents, cond, self.adapter, self.resolution, g)

    def _rows(self, comp: str) -> dict[str, torch.Tensor]:
        """token -> its trained rows for ``comp`` (``[d]`` for a one-vector word, else ``[n, d]``)."""
        out = {}
        for w in self.words:
            j = self._offset(w.token)
            rows = self.new_embs[comp][j:j + w.vectors].detach()
            out[w.token] = rows[0] if w.vectors == 1 else rows
        return out

    def _write_asset(self) -> None:
        lora: dict[str, dict[str, torch.Tensor]] = {}
        if self.lora_on:
            lora = {comp: fmt.lora_state_dict(m, self.adapter) for comp, m in self.pipe.trained_lora_modules(self.cfg)}
        targets = {comp: self.pipe.kind.lora_targets(comp, self.cfg) for comp, _ in self.pipe.trained_lora_modules(self.cfg)}
        fmt.save_asset(
            self.out_dir,
            tokens=self.tokens,
            roles={w.token: w.role for w in self.words},
            init_words={w.token: w.init_word for w in self.words},
            embeddings=self._rows("text_encoder"),
            embeddings_2=self._rows("text_encoder_2") if "text_encoder_2" in self.new_embs else None,
            lora=lora,
            lora_rank=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            targets=targets,
            family=self.pipe.family,
            unet_layout=self.pipe.kind.asset_layout(self.pipe),
        )
        fmt.write_loss_log(self.out_dir, self.log_records)


__all__ = ["train_concept", "CHECKPOINT_FILE", "PREVIEW_STEPS"]
