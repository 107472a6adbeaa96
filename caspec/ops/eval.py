"""Step kind `eval`: the paper's section 4.1 metrics over compose outputs, with open_clip.

Prompt consistency: mean CLIP text-image cosine between each image and its prompt, with pseudo-words
replaced by the user's plain words (`describe`). Identity consistency: mean pairwise CLIP image-image
cosine among the images of one concept (every image whose prompt used that asset). Where the compose step
drew a baseline (its `baseline`, the default), the same two metrics over each concept's plain-prompt twins
(scored against the same plain text: ``baselines`` in eval.json). Writes `eval.json` and `plot.png` (x: prompt consistency, y: identity consistency, one
point per concept as the paper's Fig. 5, its plain-prompt point hollow with an arrow to it, and a strip of
root | plain prompt | concept under it);
fails the step when a metric is below a threshold the spec sets, so CI can gate an asset build on quality.

The CLIP runs on the device of the spec's diffusion model. Its weights must be found before anything runs
(see :func:`caspec.metrics.clip.check_weights`); random ones (`pretrained: random`, or the default with the
embedded `tiny` model) are written into `eval.json` (``clip.random_weights``, ``clip.warning``) and the
plot's title.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StepFailed
from ..metrics.clip import load_step_clip, step_clip_params
from .base import Op, RunContext


class EvalOp(Op):
    KIND = "eval"
    VERSION = 3  # 2: eval.json and the plot say when the CLIP has random weights; CLIP on the model's device
    # 3: baselines (plain-prompt twins), the plot's root | plain | concept strip
    USES_MODEL = False

    def params(self, step: Any, spec: Any) -> dict[str, Any]:
        return {"describe": dict(step.describe), "clip": step_clip_params(step.clip, spec.model.base),
                "min_prompt_consistency": step.min_prompt_consistency,
                "min_identity_consistency": step.min_identity_consistency}

    def inputs(self, step: Any, spec_dir: Path) -> dict[str, Path]:
        return {"clip_checkpoint": (spec_dir / step.clip.checkpoint).resolve()} if step.clip.checkpoint else {}

    def upstream(self, step: Any) -> dict[str, str]:
        return {f"images{i}": sid for i, sid in enumerate(step.from_)}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from ..metrics.evaluate import check_thresholds, evaluate, plot

        p = ctx.params
        sets = gather(ctx)
        if not sets.groups:
            raise StepFailed(ctx.step_id, "no composed image uses a concept asset, so there is nothing to measure",
                             hint="evaluate compose steps whose prompts use pseudo-words")
        clip = load_step_clip(p["clip"], ctx.inputs.get("clip_checkpoint"), ctx.model)
        try:
            result = evaluate(clip, sets.groups, p["describe"], baselines=sets.baselines)
        except ValueError as exc:
            raise StepFailed(ctx.step_id, str(exc), hint="add the pseudo-word to `describe`") from None
        (ctx.out_dir / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        plot(result, ctx.out_dir / "plot.png", strip=sets.strip)
        thresholds = {k: v for k, v in (("prompt_consistency", p["min_prompt_consistency"]),
                                        ("identity_consistency", p["min_identity_consistency"])) if v is not None}
        failures = check_thresholds(result, thresholds)
        if failures:
            raise StepFailed(ctx.step_id, "quality below threshold: " + "; ".join(failures),
                             hint="the metrics are in the message; lower the threshold or improve the asset")
        return {"metrics": result["groups"], **({"baselines": result["baselines"]} if "baselines" in result else {})}


@dataclass
class Sets:
    """What eval measures, read from its compose steps: per concept its images (with their prompts) and their
    plain-prompt twins (with the prompt of the image each twins); and the plot's strip (root | plain | concept
    for the first concept that has a twin)."""

    groups: dict[str, list[tuple[Any, str]]] = field(default_factory=dict)
    baselines: dict[str, list[tuple[Any, str]]] = field(default_factory=dict)
    strip: list[tuple[str, Any]] = field(default_factory=list)


def gather(ctx: RunContext) -> Sets:
    """Group every compose image by the assets it used; each baseline twin goes with each asset its concept
    image used (once per asset)."""
    from PIL import Image

    sets = Sets()
    pairs: dict[str, list[tuple[str, Any]]] = {}  # concept -> its first (plain twin, concept image)
    firsts: dict[str, tuple[str, Any]] = {}  # concept -> its first root image
    for role in sorted(ctx.upstream):
        up = ctx.upstream[role]
        opened: dict[str, Any] = {}

        def image(entry: dict[str, Any]) -> Any:
            if entry["file"] not in opened:
                opened[entry["file"]] = Image.open(up.file(entry["file"])).convert("RGB")
            return opened[entry["file"]]

        twins = {b["id"]: b for b in up.result.get("baseline", [])}
        taken: set[tuple[str, str]] = set()
        for img in up.result.get("images", []):
            for used in img.get("assets") or []:
                name = used["asset"]
                sets.groups.setdefault(name, []).append((image(img), img["prompt"]))
                twin = twins.get(img.get("baseline"))
                if twin is not None and (name, twin["id"]) not in taken:
                    taken.add((name, twin["id"]))
                    sets.baselines.setdefault(name, []).append((image(twin), img["prompt"]))
                    pairs.setdefault(name, [(f"plain: {twin['prompt']}", image(twin)),
                                            (f"concept: {img['prompt']}", image(img))])
        for root in up.result.get("roots", []):
            for name in root.get("assets", []):
                firsts.setdefault(name, ("root" + (f": {root['prompt']}" if root.get("prompt") else ""),
                                             image(root)))
    first = next((name for name in sets.groups if name in pairs), None)
    if first is not None:
        sets.strip = ([firsts[first]] if first in firsts else []) + pairs[first]
    return sets
