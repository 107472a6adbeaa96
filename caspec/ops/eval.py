"""Step kind `eval`: the paper's section 4.1 metrics over compose outputs, with open_clip.

Prompt consistency: mean CLIP text-image cosine between each image and its prompt, with pseudo-words
replaced by the user's plain words (`describe`). Identity consistency: mean pairwise CLIP image-image
cosine among the images of one concept (every image whose prompt used that asset). Writes `eval.json` and
`plot.png` (x: prompt consistency, y: identity consistency, one point per concept, as the paper's Fig. 5);
fails the step when a metric is below a threshold the spec sets, so CI can gate an asset build on quality.

The CLIP runs on the device of the spec's diffusion model. Its weights must be found before anything runs
(see :func:`caspec.metrics.clip.check_weights`); random ones (`pretrained: random`, or the default with the
embedded `tiny` model) are written into `eval.json` (``clip.random_weights``, ``clip.warning``) and the
plot's title.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import StepFailed
from ..metrics.clip import load_step_clip, step_clip_params
from .base import Op, RunContext


class EvalOp(Op):
    KIND = "eval"
    VERSION = 2  # 2: eval.json and the plot say when the CLIP has random weights; CLIP on the model's device
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
        from PIL import Image

        from ..metrics.evaluate import check_thresholds, evaluate, plot

        p = ctx.params
        groups: dict[str, list[tuple[Any, str]]] = {}
        for role in sorted(ctx.upstream):
            up = ctx.upstream[role]
            for img in up.result.get("images", []):
                for used in img.get("assets") or []:
                    groups.setdefault(used["asset"], []).append((Image.open(up.file(img["file"])).convert("RGB"),
                                                                 img["prompt"]))
        if not groups:
            raise StepFailed(ctx.step_id, "no composed image uses a concept asset, so there is nothing to measure",
                             hint="evaluate compose steps whose prompts use pseudo-words")
        clip = load_step_clip(p["clip"], ctx.inputs.get("clip_checkpoint"), ctx.model)
        try:
            result = evaluate(clip, groups, p["describe"])
        except ValueError as exc:
            raise StepFailed(ctx.step_id, str(exc), hint="add the pseudo-word to `describe`") from None
        (ctx.out_dir / "eval.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        plot(result, ctx.out_dir / "plot.png")
        thresholds = {k: v for k, v in (("prompt_consistency", p["min_prompt_consistency"]),
                                        ("identity_consistency", p["min_identity_consistency"])) if v is not None}
        failures = check_thresholds(result, thresholds)
        if failures:
            raise StepFailed(ctx.step_id, "quality below threshold: " + "; ".join(failures),
                             hint="the metrics are in the message; lower the threshold or improve the asset")
        return {"metrics": result["groups"]}
