"""Step kind ``edit``: text-guided SDEdit variations of a root's (or selection's) images.

For each picked source image i, each edit prompt j and each candidate k the step makes
``s<i>-p<j>-c<k>.png`` (id ``s<i>-p<j>-c<k>``; i is the index in the source's image list). The
source is noised to ``strength`` and denoised under the prompt (DDIM, classifier-free guidance).
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
    VERSION = 3  # 2: sources/s<i>.png and `source_file`; 3: `source_prompt` (select by clip reads it)
    USES_MODEL = True

    def params(self, step: EditStep, spec: Spec) -> dict[str, Any]:
        s = sampling_for(spec, step)
        return {
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
        from ..models.sampling import default_batch_size, sdedit

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
        desc = f"{ctx.step_id}: sdedit"
        ctx.progress(0, len(jobs), desc)
        try:
            images = sdedit(
                pipe, [job[4] for job in jobs], [job[6] for job in jobs], [job[8] for job in jobs],
                strength=p["strength"], steps=p["steps"], guidance_scale=p["guidance_scale"],
                negative_prompt=p["negative_prompt"], resolution=p["resolution"],
                batch_size=ctx.extra.get("batch_size") or default_batch_size(pipe),
                progress=lambda done, total: ctx.progress(done, total, desc),
            )
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
                "step": ctx.step_id, "key": ctx.key, "id": iid, "model": ctx.model.base,
            })
            out.append(image_entry(iid, file, prompt=prompt, negative_prompt=p["negative_prompt"], seed=seed,
                                   source=entry.get("id"), source_index=i, source_file=source_files[i],
                                   source_prompt=entry.get("prompt"),  # select by clip: the edit's text direction
                                   prompt_index=j, candidate=k, digest=pixel_digest(image)))
        return {"images": out}


__all__ = ["EditOp", "edit_id"]
