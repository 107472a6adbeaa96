"""Step kind ``edit``: variations of a root's (or selection's) images, by text-guided SDEdit or by instruction.

For each picked source image i, each edit prompt j and each candidate k the step makes
``s<i>-p<j>-c<k>.png`` (id ``s<i>-p<j>-c<k>``; i is the index in the source's image list). With SDEdit the
source is noised to ``strength`` (diffusers' rule for the family) or ``noise_level`` (matched across families,
:mod:`caspec.families.noise`) and denoised under the prompt, as the model's family samples; with
``method: instruct`` the prompt is an instruction and the source a reference (FLUX.1 Kontext), and ``shows``
(what each result should show) becomes the candidate's prompt for CLIP selection. A step may name its own
``model:``: it enters only this step's key.
Candidate seeds are ``derive_seed(seed, "edit", source_digest, prompt, k)``: they follow the
source image's content and the prompt, so adding prompts, candidates or sources never changes
an existing image.

Each edited source image is also written, as decoded (RGB), to ``sources/s<i>.png``, and every
candidate's entry names it in ``source_file`` and the source's own prompt in ``source_prompt`` (None for a
given image): a later step (``select`` with ``by: clip``) compares a candidate with its source, and its
prompt with the source's, without going back to the source step.

No torch at module level: planning imports this module and never loads a model.
"""
from __future__ import annotations

from typing import Any

from ..errors import StepFailed
from ..spec.models import EditStep, Spec, sampling_for
from .base import Op, RunContext, image_entry
from .images import pixel_digest, save_png
from .seeds import derive_seed


def edit_id(source_index: int, prompt_index: int, k: int) -> str:
    return f"s{source_index}-p{prompt_index}-c{k}"


class EditOp(Op):
    KIND = "edit"
    VERSION = 4  # 2: sources/s<i>.png and `source_file`; 3: `source_prompt` (select by clip reads it); 4: no key in PNGs
    USES_MODEL = True
    USES_FAMILY = True

    def model_of(self, step: EditStep) -> Any:
        return step.model

    def plan_facts(self, step_id: str, step: EditStep, params: dict[str, Any], family: Any, loaded: Any) -> dict[str, Any]:
        """Where an SDEdit starts (step and σ, :mod:`caspec.families.noise`); a start from pure noise, or after the
        last step, is a spec error at the field that causes it."""
        if step.method != "sdedit":
            return {}
        from ..errors import SpecError
        from ..families.noise import edit_start
        from ..models.load import model_configs, native_resolution

        model = step.model or loaded.spec.model
        steps = int(params["steps"])
        resolution = int(params["resolution"] or native_resolution(model, loaded.dir))
        try:
            start, sigma = edit_start(family, model_configs(model, loaded.dir), steps, resolution,
                                      strength=params["strength"], noise_level=params.get("noise_level"))
        except ValueError as exc:
            field = "noise_level" if step.noise_level is not None else "strength"
            shown = field if field in step.model_fields_set or field == "noise_level" else "steps"
            raise SpecError([loaded.problem(("edits", step_id, shown), str(exc),
                                            "use a lower strength or more steps; `noise_level: 0.86` starts where "
                                            "the paper's SD 1.x edits start, on every family")]) from None
        return {"edit_start": {"step": start, "steps": steps, "sigma": round(sigma, 4)}}

    def params(self, step: EditStep, spec: Spec, family: Any = None) -> dict[str, Any]:
        s = sampling_for(spec, step, family)
        # the newer settings enter the key only when used, so older keys stay valid
        extra: dict[str, Any] = {}
        if step.method != "sdedit":
            extra["method"] = step.method
        if step.noise_level is not None:
            extra["noise_level"] = float(step.noise_level)
        if step.shows is not None:
            extra["shows"] = list(step.shows)
        if "true_cfg_scale" in s:
            extra["true_cfg_scale"] = s["true_cfg_scale"]
        return {**extra,
            "prompts": list(step.prompts),
            "pick": None if step.pick is None else list(step.pick),
            "strength": float(step.strength),
            "candidates": step.candidates,
            "seed": s["seed"],
            "steps": s["steps"],
            "guidance_scale": float(s["guidance_scale"]),
            "negative_prompt": s["negative_prompt"],
            "resolution": s["resolution"],
            "scheduler": s["scheduler"],
        }

    def upstream(self, step: EditStep) -> dict[str, str]:
        return {"source": step.from_}

    def _picked(self, ctx: RunContext, entries: list[dict[str, Any]]) -> list[int]:
        n = len(entries)
        if n == 0:
            raise StepFailed(ctx.step_id, "the source step has no images to edit",
                             hint="check the step named in `from` (a selection that kept nothing?)")
        pick = ctx.params.get("pick")
        if pick is None:
            return list(range(n))
        bad = [i for i in pick if not isinstance(i, int) or i < 0 or i >= n]
        if bad:
            valid = "0" if n == 1 else f"0..{n - 1}"
            raise StepFailed(
                ctx.step_id,
                f"`pick` index {', '.join(map(str, bad))} is out of range: the source has {n} image{'s' if n != 1 else ''} "
                f"(valid indices {valid})",
                hint=f"use indices {valid} in `pick`, or leave `pick` out to edit all of them",
            )
        dupes = sorted({i for i in pick if pick.count(i) > 1})
        if dupes:
            raise StepFailed(ctx.step_id, f"`pick` lists index {', '.join(map(str, dupes))} more than once",
                             hint="list each source index once")
        return list(pick)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from PIL import Image

        from ..models.load import load_pipeline

        p = ctx.params
        up = ctx.upstream["source"]
        entries = list(up.result.get("images", []))
        picked = self._picked(ctx, entries)

        sources = []  # (source index, entry, digest, PIL image)
        for i in picked:
            entry = entries[i]
            digest = entry.get("digest") or up.digest(entry["file"])
            try:
                with Image.open(up.file(entry["file"])) as img:
                    img.load()
                    rgb = img.convert("RGB")
            except OSError as exc:
                raise StepFailed(ctx.step_id, f"cannot read source image `{entry.get('id')}`: {exc}",
                                 hint="the store may be damaged: `caspec verify`, or re-run the source step") from None
            sources.append((i, entry, digest, rgb))

        jobs = []  # (id, source index, source entry, digest, image, prompt index, prompt, k, seed)
        for i, entry, digest, img in sources:
            for j, prompt in enumerate(p["prompts"]):
                for k in range(int(p["candidates"])):
                    seed = derive_seed(p["seed"], "edit", digest, prompt, k)
                    jobs.append((edit_id(i, j, k), i, entry, digest, img, j, prompt, k, seed))

        from .prompt_checks import check_prompts, negative_field

        pipe = load_pipeline(ctx.model, ctx.spec_dir)
        check_prompts(ctx, pipe, "edits", [*((("prompts", j), t) for j, t in enumerate(p["prompts"])),
                                           *negative_field(p)])
        instruct = p.get("method") == "instruct"
        desc = f"{ctx.step_id}: {'instruct' if instruct else 'sdedit'}"
        ctx.progress(0, len(jobs), desc)
        settings = dict(steps=p["steps"], guidance_scale=p["guidance_scale"], negative_prompt=p["negative_prompt"],
                        resolution=p["resolution"], true_cfg_scale=p.get("true_cfg_scale"),
                        batch_size=ctx.extra.get("batch_size") or pipe.kind.sampler.default_batch_size(pipe),
                        progress=lambda done, total: ctx.progress(done, total, desc))
        images_in, prompts_in, seeds_in = [job[4] for job in jobs], [job[6] for job in jobs], [job[8] for job in jobs]
        try:
            if instruct:
                images = pipe.kind.instruct(pipe, images_in, prompts_in, seeds_in, **settings)
            else:
                start, _ = edit_start_of(ctx, pipe)
                images = pipe.kind.sdedit(pipe, images_in, prompts_in, seeds_in, start=start, **settings)
        except ValueError as exc:
            raise StepFailed(ctx.step_id, str(exc),
                             hint="raise `strength` or `steps` so that int(steps * strength) >= 1") from None

        source_files = {}
        for i, entry, digest, img in sources:
            rel = f"sources/s{i}.png"
            (ctx.out_dir / "sources").mkdir(exist_ok=True)
            save_png(ctx.out_dir / rel, img, {"source": entry.get("id"), "source_digest": digest, "step": ctx.step_id})
            source_files[i] = rel

        out = []
        for (iid, i, entry, digest, _img, j, prompt, k, seed), image in zip(jobs, images):
            file = f"{iid}.png"
            save_png(ctx.out_dir / file, image, {
                "prompt": prompt, "negative_prompt": p["negative_prompt"], "seed": seed, "strength": p["strength"],
                "steps": p["steps"], "guidance_scale": p["guidance_scale"], "resolution": image.size[0],
                "scheduler": p["scheduler"], "source": entry.get("id"), "source_digest": digest,
                "step": ctx.step_id, "id": iid, "model": ctx.model.base,
            })
            shown = {"prompt": p["shows"][j], "instruction": prompt} if p.get("shows") else {"prompt": prompt}
            out.append(image_entry(iid, file, **shown, negative_prompt=p["negative_prompt"], seed=seed,
                                   source=entry.get("id"), source_index=i, source_file=source_files[i],
                                   source_prompt=entry.get("prompt"),  # select by clip: the edit's text direction
                                   prompt_index=j, candidate=k, digest=pixel_digest(image)))
        return {"images": out}


def edit_start_of(ctx: RunContext, pipe: Any) -> tuple[int, float]:
    """The SDEdit start step and its σ for this step's ``strength`` or ``noise_level`` on ``pipe``'s model."""
    from ..families.noise import edit_start
    from ..models.load import model_configs

    p = ctx.params
    return edit_start(pipe.kind, model_configs(ctx.model, ctx.spec_dir), int(p["steps"]),
                      int(p["resolution"] or pipe.resolution), strength=p["strength"], noise_level=p.get("noise_level"))


__all__ = ["EditOp", "edit_id", "edit_start_of"]
