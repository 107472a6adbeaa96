"""Step kind `select` with `by: clip` (kind ``select-clip``): CLIP scores stand in for the person.

Every candidate of the source step (a root or edit step) is embedded with open_clip, once, in batches
(candidates and their source images together; each distinct prompt embedded once), and scored:

* ``text``: cosine similarity between the candidate and its own prompt (does the edit show?);
* ``identity``: cosine similarity between the candidate and the source image it was edited from
  (is the rest preserved?). Only edit candidates have a source (``source_file``, written by the edit
  step); candidates of a ``roots`` step have none, so ``min_identity``/``max_identity`` do not apply
  to them and their identity is left out of the score;
* ``score = text + identity`` (just ``text`` where there is no source; a candidate without a prompt
  counts its text as 0 and ``min_text`` does not apply to it). Both parts are cosines in [-1, 1], so the
  score trades "the edit shows" against "the rest is preserved" with equal weight.

Decision (:func:`decide`, pure): a candidate *passes* when every threshold that is set holds
(``text >= min_text``, ``identity >= min_identity``, ``identity <= max_identity``). Passing candidates
are ranked by score (highest first; ties by candidate order) and taken greedily: one more similar
than ``max_duplicate`` to an already kept candidate is dropped as a near-duplicate; taking stops at
``top_k`` and at ``count`` (exactly ``count``: the best ``count``). When fewer than
``max(min_keep, count)`` are kept the step fails, listing the best candidates with their scores and
what each failed, so thresholds can be tuned.

Every score goes into the step's manifest (the review manifest format, default
``reviews/<spec>/<step>.yaml``) with ``keep`` decided and ``auto.keep`` recording the automatic
decision. A person may override it: a ``keep`` set differing from ``auto.keep`` replaces the automatic
decision, enters the cache key (so editing the manifest re-runs the step, and only that does) and is
kept as is on the next runs. The CLIP model name, pretrained tag and checkpoint file's sha256 are part
of the key too. The step never waits for review.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ReviewError, StepFailed
from ..review.manifest import Manifest, read_manifest
from ..spec.models import ClipSelect
from .base import GateState, Op, RunContext
from .select_manual import (_copy_kept, _count_problem, _new_candidate, _reconcile, _rel_images, _save, _show,
                            manifest_path)

SCORE_FORMULA = "text + identity (identity only where the candidate has a source image)"
SHOW_BEST = 5  # candidates listed when too few pass


@dataclass(frozen=True)
class Settings:
    """The thresholds of a clip selection (None: not applied)."""

    min_text: float | None = None
    min_identity: float | None = None
    max_identity: float | None = None
    max_duplicate: float | None = None
    top_k: int | None = None
    min_keep: int = 1
    count: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Settings":
        return cls(**{k: params.get(k) for k in ("min_text", "min_identity", "max_identity", "max_duplicate",
                                                 "top_k", "count")}, min_keep=int(params.get("min_keep", 1)))

    @property
    def required(self) -> int:
        return max(self.min_keep, self.count or 0)

    @property
    def limit(self) -> int | None:
        caps = [c for c in (self.top_k, self.count) if c is not None]
        return min(caps) if caps else None


@dataclass
class Decision:
    """What :func:`decide` found: kept indices (best first), and per candidate its score, whether it
    passed the thresholds and why it was kept or not. ``problem`` is non-empty when too few were kept."""

    kept: list[int]
    scores: list[float]
    passed: list[bool]
    why: list[str]
    problem: str = ""
    ranked: list[int] = field(default_factory=list)


def score_of(text: float | None, identity: float | None) -> float:
    """The documented ranking score: ``text + identity`` (a missing part counts 0)."""
    return (text or 0.0) + (identity or 0.0)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def decide(text_sims: Sequence[float | None], identity_sims: Sequence[float | None],
           dup: Any | None, settings: Settings, ids: Sequence[str] | None = None) -> Decision:
    """Pure selection on fixed similarities.

    ``text_sims[i]``: candidate i vs its prompt (None: no prompt); ``identity_sims[i]``: vs its source
    (None: no source, identity thresholds skipped); ``dup[i][j]``: candidate-candidate similarity
    (needed only with ``max_duplicate``). ``ids`` name candidates in messages (default: their indices).
    """
    n = len(text_sims)
    if len(identity_sims) != n:
        raise ValueError("text_sims and identity_sims differ in length")
    names = list(ids) if ids is not None else [f"#{i}" for i in range(n)]
    s = settings
    scores = [score_of(text_sims[i], identity_sims[i]) for i in range(n)]
    passed, why = [], []
    for i in range(n):
        t, d = text_sims[i], identity_sims[i]
        fails = []
        if s.min_text is not None and t is not None and t < s.min_text:
            fails.append(f"text {_f(t)} < min_text {s.min_text:g}")
        if s.min_identity is not None and d is not None and d < s.min_identity:
            fails.append(f"identity {_f(d)} < min_identity {s.min_identity:g}")
        if s.max_identity is not None and d is not None and d > s.max_identity:
            fails.append(f"identity {_f(d)} > max_identity {s.max_identity:g}")
        passed.append(not fails)
        why.append("; ".join(fails))
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    limit = s.limit
    for i in ranked:
        if not passed[i]:
            continue
        if s.max_duplicate is not None and dup is not None:
            near = [j for j in kept if float(dup[i][j]) > s.max_duplicate]
            if near:
                j = near[0]
                why[i] = f"near-duplicate of {names[j]} ({float(dup[i][j]):.3f} > max_duplicate {s.max_duplicate:g})"
                continue
        if limit is not None and len(kept) >= limit:
            cap = "count" if s.count is not None and limit == s.count else "top_k"
            why[i] = f"passed, but beyond {cap} {limit}"
            continue
        kept.append(i)
        why[i] = f"kept (rank {len(kept)})"
    problem = ""
    if limit is not None and limit < s.required:
        problem = (f"`top_k: {s.top_k}` keeps fewer than the {s.required} the step needs "
                   f"(`count`/`min_keep`)")
    elif len(kept) < s.required:
        need = f"exactly {s.count}" if s.count is not None and s.count >= s.min_keep else f"at least {s.required}"
        best = "; ".join(f"{names[i]}: score {scores[i]:.3f} (text {_f(text_sims[i])}, identity "
                         f"{_f(identity_sims[i])}) {why[i]}" for i in ranked[:SHOW_BEST])
        problem = (f"only {len(kept)} of {n} candidate(s) kept, the step needs {need}. "
                   f"Best scores: {best or 'no candidates'}")
    return Decision(kept=kept, scores=scores, passed=passed, why=why, problem=problem, ranked=ranked)


def _settings(step: Any) -> ClipSelect:
    return step.clip if step.clip is not None else ClipSelect()


def _override(m: Manifest | None, by_id: dict[str, str] | None) -> tuple[list[str] | None, list[str] | None]:
    """(override digests, unresolved override ids): the person's decision if the manifest's keep set
    differs from its recorded automatic decision (or, with no record, if anything is kept)."""
    if m is None:
        return None, None
    decision = m.decision(by_id)
    if decision is None:  # pre-filled by id, candidates not there yet
        return None, sorted(c.id for c in m.kept())
    kept = decision["keep"]
    auto = m.auto_keep
    if auto is None:
        return (kept or None), None
    return (kept if kept != auto else None), None


class SelectClipOp(Op):
    KIND = "select-clip"
    VERSION = 1
    USES_MODEL = False
    IS_GATE = True

    def params(self, step: Any, spec: Any) -> dict[str, Any]:
        from ..metrics.clip import ClipSpec, _check_spec, clip_identity

        c = _settings(step)
        _check_spec(ClipSpec(c.model, c.pretrained, c.checkpoint))
        ident = clip_identity(ClipSpec(c.model, c.pretrained, None))  # pure parts; the checkpoint is an input
        if c.checkpoint:
            ident.pop("init_seed", None)
        ident.pop("checkpoint_sha256", None)
        return {"by": step.by, "count": step.count, "model": c.model, "pretrained": c.pretrained,
                "checkpoint": bool(c.checkpoint), "clip": ident,
                "min_text": c.min_text, "min_identity": c.min_identity, "max_identity": c.max_identity,
                "max_duplicate": c.max_duplicate, "top_k": c.top_k, "min_keep": c.min_keep}

    def inputs(self, step: Any, spec_dir: Path) -> dict[str, Path]:
        c = _settings(step)
        return {"clip_checkpoint": (spec_dir / Path(c.checkpoint).expanduser()).resolve()} if c.checkpoint else {}

    def upstream(self, step: Any) -> dict[str, str]:
        return {"source": step.from_}

    def gate(self, step: Any, step_id: str, loaded: Any, upstream: dict[str, Any] | None = None) -> GateState:
        path = manifest_path(loaded, step_id, step)
        try:
            m = read_manifest(path)
        except ReviewError as exc:  # run reports it (a person's broken edit is never overwritten)
            return GateState(path, True, {"override": "unreadable"}, f"manifest unreadable: {exc.message}")
        source = (upstream or {}).get("source")
        by_id = {img["id"]: img["digest"] for img in source.result["images"]} if source is not None else None
        digests, ids = _override(m, by_id)
        if ids is not None:
            return GateState(path, True, {"override_ids": ids}, "", m.source_key if m else None, provisional=True)
        return GateState(path, True, {"override": digests}, "", m.source_key if m else None)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        p = ctx.params
        source = ctx.upstream["source"]
        path: Path = ctx.extra["manifest"]
        images = list(source.result.get("images", []))
        if not images:
            raise StepFailed(ctx.step_id, "the source step has no candidates to select from",
                             hint="check the step named in `from`")
        old = read_manifest(path)  # ReviewError if a person broke it: reported, not overwritten
        override, _ = _override(old, {img["id"]: img["digest"] for img in images})
        expected = (ctx.extra.get("decision") or {})
        if "override" in expected and expected["override"] != override:
            raise ReviewError(ctx.step_id, f"`{_show(path)}` changed while the run was starting",
                              hint="re-run `caspec run` to pick up the new decision")

        sims = _similarities(ctx, source, images)
        settings = Settings.from_params(p)
        ids = [img["id"] for img in images]
        d = decide(sims["text"], sims["identity"], sims["dup"], settings, ids)
        auto_keep = sorted(images[i]["digest"] for i in d.kept)
        table = {img["id"]: _score_block(sims, d, i) for i, img in enumerate(images)}

        rel = _rel_images(path, ctx.extra.get("source_out_dir"), images)
        auto = {"by": "clip", "model": p["model"], "pretrained": p["pretrained"],
                "checkpoint": str(ctx.inputs["clip_checkpoint"]) if "clip_checkpoint" in ctx.inputs else None,
                "score": SCORE_FORMULA,
                "settings": {k: p[k] for k in ("min_text", "min_identity", "max_identity", "max_duplicate",
                                               "top_k", "min_keep", "count")},
                "keep": auto_keep}
        if override is None:
            m = Manifest(path, ctx.spec_name, ctx.step_id, ctx.extra.get("source_id", ""), source.key, p["count"],
                         [_new_candidate(img, rel) for img in images], auto=auto)
            keep = set(auto_keep)
            for c in m.candidates:
                c.keep = c.digest in keep
        else:  # a person's decision: verify it against the candidates, keep it, refresh the scores
            m = old
            _reconcile(ctx.step_id, m, images, rel, source.key)  # stale -> ReviewError listing them
            m.auto = auto
            m.count = p["count"]
        by_digest = {img["digest"]: img["id"] for img in images}
        for c in m.candidates:
            c.meta["scores"] = table[by_digest[c.digest]]
        _save(m)  # manifest + contact sheet, also when the step fails below

        if override is None and d.problem:
            raise StepFailed(ctx.step_id, f"CLIP selection: {d.problem}",
                             hint=f"lower `min_text`/`min_identity` (or raise `max_identity`/`max_duplicate`), make more "
                                  f"candidates, or lower `min_keep`/`count`; every score is in `{_show(path)}`")
        if override is not None:
            problem = _count_problem(len(m.kept()), p["count"])
            if problem:
                raise ReviewError(ctx.step_id, f"`{_show(path)}` overrides the CLIP selection, but {problem}",
                                  hint="fix `keep:` in the manifest, or delete it to go back to the automatic decision")
        kept = _copy_kept(ctx, source, images, m)  # in the source's order, like a manual selection
        out = []
        for img in kept:
            entry = {k: v for k, v in img.items() if k != "source_file"}  # that file is not in this step's output
            entry["scores"] = table[img["id"]]
            out.append(entry)
        return {"images": out,
                "decision": {"keep": sorted(e["digest"] for e in out), "by": "hand" if override is not None else "clip",
                             "auto_keep": auto_keep},
                "scores": table}


def _score_block(sims: dict[str, Any], d: Decision, i: int) -> dict[str, Any]:
    r = (lambda x: None if x is None else round(float(x), 4))
    return {"text": r(sims["text"][i]), "identity": r(sims["identity"][i]), "score": r(d.scores[i]),
            "passed": d.passed[i], "why": d.why[i]}


def _similarities(ctx: RunContext, source: Any, images: list[dict[str, Any]]) -> dict[str, Any]:
    """Embed the candidates and their source images in one batched pass, each distinct prompt once."""
    from ..metrics.clip import ClipSpec, load_clip

    p = ctx.params
    checkpoint = ctx.inputs.get("clip_checkpoint")
    clip = load_clip(ClipSpec(p["model"], p["pretrained"], str(checkpoint) if checkpoint else None))
    src_files: list[str] = []
    for img in images:
        rel = img.get("source_file")
        if rel and rel not in src_files and _has_file(source, rel):
            src_files.append(rel)
    paths = [source.file(img["file"]) for img in images] + [source.file(rel) for rel in src_files]
    ctx.progress(0, len(paths), f"{ctx.step_id}: clip")
    try:
        emb = clip.embed_images(paths)
    except OSError as exc:
        raise StepFailed(ctx.step_id, f"cannot read a candidate image: {exc}",
                         hint="the store may be damaged: `caspec verify`, or re-run the source step") from None
    ctx.progress(len(paths), len(paths), f"{ctx.step_id}: clip")
    n = len(images)
    cand, srcs = emb[:n], emb[n:]
    prompts = sorted({str(img["prompt"]) for img in images if img.get("prompt")})
    text_emb = clip.embed_texts(prompts) if prompts else None
    text: list[float | None] = []
    identity: list[float | None] = []
    for i, img in enumerate(images):
        prompt = img.get("prompt")
        text.append(float(cand[i] @ text_emb[prompts.index(str(prompt))]) if prompt else None)
        rel = img.get("source_file")
        identity.append(float(cand[i] @ srcs[src_files.index(rel)]) if rel in src_files else None)
    dup = (cand @ cand.T).tolist() if p.get("max_duplicate") is not None else None
    return {"text": text, "identity": identity, "dup": dup}


def _has_file(source: Any, rel: str) -> bool:
    try:
        return Path(source.file(rel)).is_file()
    except (KeyError, OSError):
        return False


__all__ = ["SelectClipOp", "Settings", "Decision", "decide", "score_of", "SCORE_FORMULA"]
