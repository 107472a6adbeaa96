"""Step kind ``root``: a root image, generated from a seed prompt (txt2img) or given as a file.

Generated roots make ``candidates`` images ``c000.png``, ``c001.png``, ... (ids ``c000``, ...);
candidate k's seed is ``derive_seed(seed, "root", prompt, k)``, so raising ``candidates`` keeps
the existing images. A given image becomes ``c000.png``: RGB, center-cropped to a square and
resized (LANCZOS) to the resolution.

No torch at module level: planning imports this module and never loads a model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import StepFailed
from ..spec.models import RootStep, Spec, sampling_for
from .base import Op, RunContext, image_entry
from .images import fit_square, pixel_digest, save_png
from .seeds import derive_seed


def candidate_id(k: int) -> str:
    return f"c{k:03d}"


class GenerateOp(Op):
    KIND = "root"
    VERSION = 2  # 2: PNGs no longer carry the step key or caspec version (early cutoff)
    USES_MODEL = True
    USES_FAMILY = True

    def params(self, step: RootStep, spec: Spec, family: Any = None) -> dict[str, Any]:
        s = sampling_for(spec, step, family)
        if step.image is not None:
            return {"mode": "image", "resolution": s["resolution"]}
        return {
            "mode": "generate",
            "prompt": step.prompt,
            "negative_prompt": s["negative_prompt"],
            "candidates": step.candidates,
            "seed": s["seed"],
            "steps": s["steps"],
            "guidance_scale": float(s["guidance_scale"]),
            "resolution": s["resolution"],
            "scheduler": s["scheduler"],
            **({"true_cfg_scale": s["true_cfg_scale"]} if "true_cfg_scale" in s else {}),
        }

    def inputs(self, step: RootStep, spec_dir: Path) -> dict[str, Path]:
        if step.image is None:
            return {}
        path = Path(step.image).expanduser()
        if not path.is_absolute():
            path = Path(spec_dir) / path
        return {"image": path.resolve()}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        if ctx.params.get("mode") == "image":
            return self._run_image(ctx)
        return self._run_generate(ctx)

    # -- a given image ---------------------------------------------------------------------

    def _run_image(self, ctx: RunContext) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        path = ctx.inputs.get("image")
        if path is None:
            raise StepFailed(ctx.step_id, "no root image was passed to the step",
                             hint="the root's `image` must name a file relative to the spec")
        resolution = ctx.params.get("resolution")
        if resolution is None:
            from ..models.load import native_resolution

            resolution = native_resolution(ctx.model, ctx.spec_dir)
        try:
            with Image.open(path) as img:
                img.load()
                fitted = fit_square(img, int(resolution))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise StepFailed(
                ctx.step_id, f"cannot read root image `{path}`: {exc}",
                hint="check that the path (relative to the spec file) names a readable PNG/JPEG/WebP image",
            ) from None
        file = "c000.png"
        save_png(ctx.out_dir / file, fitted, {
            "step": ctx.step_id, "given": Path(path).name, "resolution": int(resolution),
        })
        ctx.progress(1, 1, f"{ctx.step_id}: image")
        return {"images": [image_entry("c000", file, prompt=None, negative_prompt=None, seed=None, source=None,
                                       prompt_index=None, candidate=0, given=Path(path).name,
                                       digest=pixel_digest(fitted))]}

    # -- txt2img -------------------------------------------------------------------------

    def _run_generate(self, ctx: RunContext) -> dict[str, Any]:
        from ..models.load import load_pipeline

        p = ctx.params
        from .prompt_checks import check_prompts, negative_field

        pipe = load_pipeline(ctx.model, ctx.spec_dir)
        n = int(p["candidates"])
        prompt = p["prompt"]
        check_prompts(ctx, pipe, "roots", [(("prompt",), prompt), *negative_field(p)])
        seeds = [derive_seed(p["seed"], "root", prompt, k) for k in range(n)]
        desc = f"{ctx.step_id}: generating"
        ctx.progress(0, n, desc)
        try:
            images = pipe.kind.txt2img(
                pipe, [prompt] * n, seeds,
                steps=p["steps"], guidance_scale=p["guidance_scale"], negative_prompt=p["negative_prompt"],
                resolution=p["resolution"], true_cfg_scale=p.get("true_cfg_scale"),
                batch_size=ctx.extra.get("batch_size") or pipe.kind.sampler.default_batch_size(pipe),
                progress=lambda done, total: ctx.progress(done, total, desc),
            )
        except ValueError as exc:
            raise StepFailed(ctx.step_id, str(exc)) from None
        entries = []
        for k, (img, seed) in enumerate(zip(images, seeds)):
            cid = candidate_id(k)
            file = f"{cid}.png"
            save_png(ctx.out_dir / file, img, {
                "prompt": prompt, "negative_prompt": p["negative_prompt"], "seed": seed, "steps": p["steps"],
                "guidance_scale": p["guidance_scale"], "resolution": img.size[0], "scheduler": p["scheduler"],
                "source": None, "step": ctx.step_id, "id": cid, "model": ctx.model.base,
            })
            entries.append(image_entry(cid, file, prompt=prompt, negative_prompt=p["negative_prompt"], seed=seed,
                                       source=None, prompt_index=0, candidate=k, digest=pixel_digest(img)))
        return {"images": entries}


__all__ = ["GenerateOp", "candidate_id"]
