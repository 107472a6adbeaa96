"""Step kind `train` (spec section `concepts`): turn the images of a step into a concept asset.

Image k (1-based, in the upstream step's order) gets the caption template with `{k}` = k, e.g.
`<dance1> <robot3>`: one shared pseudo-word for the constant attribute, one per image for the varied one
(paper, section 3.3-3.4). Training itself is `caspec.train`; the asset format is `caspec.assets`.
A killed training resumes from its last checkpoint, kept in the store under the step's key.

`checkpoint_every` and `preview_every` decide when the run saves and renders, never the trained weights,
so they are not part of the key (`RUN_SETTINGS`): changing them neither retrains nor orphans a
checkpoint. Intermediate previews (`previews/step-N-*.png`, N < the last step) are a record of the run
that made the asset, like its timings: a cached asset keeps those of its run, and its card says under
`run:` which settings made them. The final previews depend only on the weights and `preview_prompts`
(which are in the key).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ..environment import library_versions
from .. import families
from ..errors import StepFailed
from ..train.config import keyed_settings
from .base import Op, RunContext

LIBRARIES = ("caspec", "torch", "diffusers", "transformers", "peft")
RUN_SETTINGS = ("checkpoint_every", "preview_every")  # not in the key: they never change the weights


class TrainOp(Op):
    KIND = "train"
    VERSION = 3  # 3: the card no longer holds the step key (early cutoff); 2: checkpoint_every / preview_every left the key (the card records them under `run`);
                # the card's result lost `seconds`/`resumed_from` (now in the record's meta)

    USES_FAMILY = True

    def params(self, step: Any, spec: Any, family: Any = None) -> dict[str, Any]:
        settings = keyed_settings({k: v for k, v in step.train.model_dump().items() if k not in RUN_SETTINGS})
        defaults = (family or families.get("sd1")).default_targets  # unset targets: the family's
        settings["unet_targets"] = list(settings["unet_targets"] or defaults["unet"])
        settings["text_targets"] = list(settings["text_targets"] or defaults["text"])
        if settings.get("lora_window") == "auto":  # the measurement's version decides the card's window
            from ..train.window import VERSION

            settings["window_measure"] = VERSION
        settings["seed"] = spec.defaults.seed if settings["seed"] is None else settings["seed"]
        settings["lora_alpha"] = float(settings["lora_alpha"] or settings["lora_rank"])
        # `vectors` (and the LATER_SETTINGS) enter the key only when not the default: older keys stay valid
        return {"words": [{"token": w.token, "init": w.init, **({"vectors": w.vectors} if w.vectors != 1 else {})}
                          for w in step.words],
                "caption": step.caption if step.caption is not None else " ".join(w.token for w in step.words),
                "preview_prompts": step.preview_prompts, "resolution": step.resolution, "train": settings}

    def upstream(self, step: Any) -> dict[str, str]:
        return {"images": step.from_}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from PIL import Image

        from ..assets.format import write_card
        from ..models.load import load_pipeline
        from ..train import TrainConfig, train_concept
        from .images import fit_square

        p = ctx.params
        source = ctx.upstream["images"]
        images = source.result.get("images") or []
        if not images:
            raise StepFailed(ctx.step_id, "the upstream step kept no images to learn from",
                             hint="keep at least one candidate in the review (the paper keeps 5-8)")
        pipe = load_pipeline(ctx.model, ctx.spec_dir, fresh=True)
        _check_targets(ctx, pipe, p["train"])
        res = p["resolution"] or pipe.resolution
        n = len(images)
        words = _expand_words(p["words"], n)
        captions = [p["caption"].replace("{k}", str(k)) for k in range(1, n + 1)]
        _check_prompts(ctx, pipe, p, words, captions)
        items = [(fit_square(Image.open(source.file(img["file"])).convert("RGB"), res), cap)
                 for img, cap in zip(images, captions)]
        run_settings = _run_settings(ctx)
        cfg = TrainConfig(**{**{k: v for k, v in p["train"].items() if k != "window_measure"}, **run_settings, "unet_targets": tuple(p["train"]["unet_targets"]),
                             "text_targets": tuple(p["train"]["text_targets"])})
        total = cfg.phase1_steps + cfg.phase2_steps

        def progress(step: int, _total: int, info: dict[str, Any]) -> None:
            ctx.progress(step, total, f"{ctx.step_id}: loss {info.get('loss', float('nan')):.4f}")

        try:
            summary = train_concept(pipe, words, items, cfg, ctx.out_dir, checkpoint_dir=ctx.extra["checkpoint_dir"],
                                    preview_prompts=p["preview_prompts"], progress=progress)
        except ValueError as exc:
            raise StepFailed(ctx.step_id, str(exc)) from None
        card = _card(ctx, p, words, captions, images, source.key, summary, run_settings, pipe.family)
        write_card(ctx.out_dir, card)
        ctx.meta.update({k: summary.get(k) for k in ("seconds", "steps_run", "resumed_from")})
        return {"asset": {"tokens": [w.token for w in words], "final_loss": summary.get("final_loss"),
                          "images": n}}


def _run_settings(ctx: RunContext) -> dict[str, int]:
    """`checkpoint_every` / `preview_every` from the spec step (not in the params: see RUN_SETTINGS)."""
    from ..train import TrainConfig

    train = getattr(ctx.extra.get("step"), "train", None)
    defaults = TrainConfig()
    return {name: int(getattr(train, name, getattr(defaults, name))) for name in RUN_SETTINGS}


def _check_targets(ctx: RunContext, pipe: Any, train: dict[str, Any]) -> None:
    """Unknown LoRA target modules fail before any work, naming the spec field and its position."""
    from ..assets.format import check_targets

    where = ctx.extra.get("where", lambda *path: "")
    cfg = SimpleNamespace(**train)
    checks = [("unet_targets" if comp == pipe.kind.denoiser else "text_targets", comp, module,
               f"the {comp.replace('_', ' ') if comp != 'unet' else 'UNet'}")
              for comp, module in pipe.trained_lora_modules(cfg)]
    for field, comp, module, what in checks:
        for i, target in enumerate(pipe.kind.lora_targets(comp, cfg)):
            try:
                check_targets(module, [target], what)
            except ValueError as exc:
                raise StepFailed(ctx.step_id, f"{where('train', field, i)}: concepts.{ctx.step_id}.train.{field}[{i}]: "
                                 f"{exc}", hint=f"LoRA targets are module names of {what} (suffix match)") from None


def _check_prompts(ctx: RunContext, pipe: Any, p: dict[str, Any], words: list[Any], captions: list[str]) -> None:
    """Captions and preview prompts fit the text encoder (a cut caption would train on a lost pseudo-word)."""
    from .prompt_checks import check_prompts

    caption_path = ("caption",) if getattr(ctx.extra.get("step"), "caption", None) is not None else ("words",)
    fields = [(caption_path, c) for c in captions]
    fields += [(("preview_prompts", i), t) for i, t in enumerate(p["preview_prompts"] or [])]
    from ..models.text import sub_tokens

    check_prompts(ctx, pipe, "concepts", fields, pseudo_words=[w.token for w in words],
                  expansions={w.token: sub_tokens(w.token, w.vectors) for w in words})


def _expand_words(words: list[dict[str, str]], n: int) -> list[Any]:
    from ..train import PseudoWord

    out = []
    for w in words:
        vectors = int(w.get("vectors", 1))
        if "{k}" in w["token"]:
            out += [PseudoWord(w["token"].replace("{k}", str(k)), w["init"], "varied", vectors) for k in range(1, n + 1)]
        else:
            out.append(PseudoWord(w["token"], w["init"], "constant", vectors))
    return out


def _card(ctx: RunContext, p: dict[str, Any], words: list[Any], captions: list[str], images: list[dict[str, Any]],
          source_key: str, summary: dict[str, Any], run_settings: dict[str, int], family: str) -> dict[str, Any]:
    return {
        "format": 1,
        "kind": "caspec concept asset",
        "pseudo_words": [{"token": w.token, "init": w.init, "role": w.role, **({"vectors": w.vectors}
                                                                               if w.vectors != 1 else {})}
                         for w in words],
        "captions": captions,
        "base_model": {"base": ctx.model.base, "family": family,
                       "identity": ctx.extra.get("model_identity")},
        "training": p["train"],
        "run": run_settings,
        "seed": p["train"]["seed"],
        "training_images": {"step_key": source_key,
                            "images": [{"id": img["id"], "digest": img["digest"], "prompt": img.get("prompt")}
                                       for img in images]},
        "libraries": {name: library_versions()[name] or "unknown" for name in LIBRARIES},
        # what the weights are, never how this run went (time, resumption: in the record's meta["run"]),
        # so a resumed or re-run training that makes the same weights makes the same card
        "result": {k: summary.get(k) for k in ("initial_loss", "final_loss", "steps")},
        # the noise levels its denoiser LoRA should act in when composed (lora_window: set, or measured)
        **({"lora_window": summary["lora_window"]} if summary.get("lora_window") else {}),
    }
