"""Step kind `select` with `by: clip` (kind ``select-clip``): CLIP scores stand in for the person.

Every candidate of the source step (a root or edit step) is embedded with open_clip, once, in batches
(candidates and their source images together; each distinct prompt embedded once), on the device of the
spec's diffusion model, and scored (:mod:`caspec.metrics.edit_score`). With ``I``/``T`` CLIP's unit image
and text embeddings, ``c`` a candidate, ``s`` its source image, ``p`` its edit prompt and ``q`` its source's
prompt:

* an edit candidate is ranked by the **directional similarity** ``cos(I(c) - I(s), T(p) - T(q))``: does
  the image change the way the text does (StyleGAN-NADA; InstructPix2Pix's evaluation)? A copy of its
  source scores 0. When ``q`` is unknown (a user-given root image) ``cos(I(c),T(p)) - cos(I(s),T(p))``
  stands in (the prompt matches the candidate better than its source);
* a **no-op** edit (``T(p) = T(q)``: the edit prompt is the source's prompt) asks for no change and has no
  direction: it never passes in a step that has real edits (a step of no-ops only, i.e. variations, ranks
  them by ``text`` like a root);
* a candidate of a ``roots`` step has no source: it is ranked by ``text = cos(I(c), T(p))``.

Decision (:func:`decide`, pure): a candidate *passes* when every threshold that is set holds. Edit scores
must exceed ``min_direction`` (default 0: the image moved towards the edit) and reach
``min_relative_direction`` (default 0.6) times the best edit score among the candidates of the same
source image: the score is normalised within a source, so a change that barely shows loses to the
sibling edits that show, on any CLIP. ``min_identity`` is the identity floor (``cos(I(c), I(s))``: is the
rest preserved?) and ``max_identity`` its ceiling; ``min_text`` applies to ``text``. Passing candidates are
ranked by score (highest first; ties by candidate order) and taken greedily: one more similar than
``max_duplicate`` to an already kept candidate is dropped as a near-duplicate; taking stops at ``top_k``
and at ``count`` (exactly ``count``: the best ``count``). When fewer than ``max(min_keep, count)`` are
kept the step fails, listing the best candidates with their scores and what each failed.

Every score goes into the step's manifest (the review manifest format, default
``reviews/<spec>/<step>.yaml``) with ``keep`` decided and ``auto.keep`` recording the automatic
decision, and ``auto.warning`` when the CLIP has random weights. A person may override it: a ``keep`` set
differing from ``auto.keep`` replaces the automatic decision, enters the cache key (so editing the
manifest re-runs the step, and only that does) and is kept as is on the next runs. The CLIP model,
its weights (tag and the cached snapshot it resolves to, or the checkpoint file's sha256) are part of the
key too. The step never waits for review.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ReviewError, StepFailed
from ..metrics.clip import load_step_clip, step_clip_params, weights_info
from ..metrics.edit_score import FORMULAS, EditScore
from ..review.manifest import Manifest, read_manifest
from ..spec.models import ClipSelect
from .base import GateState, Op, RunContext
from .selection import copy_kept, count_problem, manifest_path, new_candidate, reconcile, rel_images, \
    save_manifest, show_path

SCORE_FORMULA = ("edit candidates: directional similarity cos(I(c) - I(s), T(p) - T(q)) (c candidate, s source image, "
                 "p edit prompt, q source prompt; cos(I(c),T(p)) - cos(I(s),T(p)) when q is unknown); no-op edits "
                 "(p = q) never pass beside real edits; roots: text cos(I(c), T(p))")
SHOW_BEST = 5  # candidates listed when too few pass
THRESHOLDS = ("min_direction", "min_relative_direction", "min_text", "min_identity", "max_identity", "max_duplicate")


@dataclass(frozen=True)
class Settings:
    """The thresholds of a clip selection (None: not applied). The defaults are the spec's."""

    min_direction: float | None = 0.0
    min_relative_direction: float | None = 0.6
    min_text: float | None = None
    min_identity: float | None = None
    max_identity: float | None = None
    max_duplicate: float | None = None
    top_k: int | None = None
    min_keep: int = 1
    count: int | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Settings":
        return cls(**{k: params.get(k) for k in (*THRESHOLDS, "top_k", "count")},
                   min_keep=int(params.get("min_keep", 1)))

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
    passed the thresholds and why it was kept or not; ``relative``: its edit score over the best of its
    source's candidates. ``problem`` is non-empty when too few were kept."""

    kept: list[int]
    scores: list[float]
    passed: list[bool]
    why: list[str]
    problem: str = ""
    ranked: list[int] = field(default_factory=list)
    relative: list[float | None] = field(default_factory=list)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _best_edit_by_source(scores: Sequence[EditScore], sources: Sequence[str | None]) -> dict[str | None, float]:
    best: dict[str | None, float] = {}
    for sc, src in zip(scores, sources):
        if sc.edit is not None:
            best[src] = max(best.get(src, sc.edit), sc.edit)
    return best


def relative_edits(scores: Sequence[EditScore], sources: Sequence[str | None]) -> list[float | None]:
    """Each edit score over the best edit score among the candidates of the same source (None where there
    is no edit score, or the best is not positive): the score normalised within a source."""
    best = _best_edit_by_source(scores, sources)
    out: list[float | None] = []
    for sc, src in zip(scores, sources):
        top = best.get(src)
        out.append(sc.edit / top if sc.edit is not None and top is not None and top > 0 else None)
    return out


def _failures(sc: EditScore, rel: float | None, best: float | None, s: Settings, has_edits: bool) -> list[str]:
    """Why candidate score ``sc`` does not pass ``s`` (empty: it passes)."""
    if sc.noop and has_edits:
        return ["no-op edit: its prompt is its source's prompt, so it shows no edit (the step has real edits)"]
    fails = []
    e = sc.edit
    if s.min_direction is not None and e is not None and e <= s.min_direction:
        fails.append(f"{sc.formula} {_f(e)} <= min_direction {s.min_direction:g}")
    if s.min_relative_direction is not None and rel is not None and rel < s.min_relative_direction:
        fails.append(f"{sc.formula} {_f(e)} < min_relative_direction {s.min_relative_direction:g} x the best of its "
                     f"source ({_f(best)})")
    t, d = sc.text, sc.identity
    if s.min_text is not None and t is not None and t < s.min_text:
        fails.append(f"text {_f(t)} < min_text {s.min_text:g}")
    if s.min_identity is not None and d is not None and d < s.min_identity:
        fails.append(f"identity {_f(d)} < min_identity {s.min_identity:g}")
    if s.max_identity is not None and d is not None and d > s.max_identity:
        fails.append(f"identity {_f(d)} > max_identity {s.max_identity:g}")
    return fails


def _take(ranked: list[int], passed: list[bool], why: list[str], dup: Any | None, s: Settings,
          names: list[str]) -> list[int]:
    """Greedy taking in rank order: near-duplicates dropped, stopping at ``top_k``/``count``."""
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
    return kept


def _describe(sc: EditScore) -> str:
    parts = [f"{sc.formula} {_f(sc.edit)}"] if sc.edit is not None else []
    parts += [f"text {_f(sc.text)}", f"identity {_f(sc.identity)}"]
    return ", ".join(parts)


def decide(scores: Sequence[EditScore], dup: Any | None, settings: Settings, ids: Sequence[str] | None = None,
           sources: Sequence[str | None] | None = None) -> Decision:
    """Pure selection on fixed scores.

    ``scores[i]``: candidate i's :class:`~caspec.metrics.edit_score.EditScore`; ``dup[i][j]``: candidate-
    candidate image similarity (needed only with ``max_duplicate``); ``ids`` name candidates in messages
    (default: their indices); ``sources[i]``: candidate i's source image (the group ``min_relative_direction``
    compares within; default: one group).
    """
    n = len(scores)
    names = list(ids) if ids is not None else [f"#{i}" for i in range(n)]
    groups = list(sources) if sources is not None else [None] * n
    if len(names) != n or len(groups) != n:
        raise ValueError("scores, ids and sources differ in length")
    s = settings
    rel = relative_edits(scores, groups)
    best = _best_edit_by_source(scores, groups)
    has_edits = any(sc.edit is not None for sc in scores)
    values = [sc.score for sc in scores]
    why = ["; ".join(_failures(sc, rel[i], best.get(groups[i]), s, has_edits)) for i, sc in enumerate(scores)]
    passed = [not w for w in why]
    ranked = sorted(range(n), key=lambda i: (-values[i], i))
    kept = _take(ranked, passed, why, dup, s, names)
    problem = ""
    if s.limit is not None and s.limit < s.required:
        problem = (f"`top_k: {s.top_k}` keeps fewer than the {s.required} the step needs "
                   f"(`count`/`min_keep`)")
    elif len(kept) < s.required:
        need = f"exactly {s.count}" if s.count is not None and s.count >= s.min_keep else f"at least {s.required}"
        shown = "; ".join(f"{names[i]}: score {values[i]:.3f} ({_describe(scores[i])}) {why[i]}"
                          for i in ranked[:SHOW_BEST])
        problem = (f"only {len(kept)} of {n} candidate(s) kept, the step needs {need}. "
                   f"Best scores: {shown or 'no candidates'}")
    return Decision(kept=kept, scores=values, passed=passed, why=why, problem=problem, ranked=ranked, relative=rel)


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
    VERSION = 2  # 2: ranked by directional similarity, no-ops refused, relative threshold; CLIP on the model's device
    USES_MODEL = False
    IS_GATE = True

    def params(self, step: Any, spec: Any) -> dict[str, Any]:
        c = _settings(step)
        return {"by": step.by, "count": step.count, **step_clip_params(c, spec.model.base),
                **{k: getattr(c, k) for k in THRESHOLDS}, "top_k": c.top_k, "min_keep": c.min_keep}

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
            raise ReviewError(ctx.step_id, f"`{show_path(path)}` changed while the run was starting",
                              hint="re-run `caspec run` to pick up the new decision")

        scores, dup = _similarities(ctx, source, images)
        ids = [img["id"] for img in images]
        d = decide(scores, dup, Settings.from_params(p), ids, [_source_of(img) for img in images])
        auto_keep = sorted(images[i]["digest"] for i in d.kept)
        table = {img["id"]: _score_block(scores[i], d, i) for i, img in enumerate(images)}
        m = self._manifest(ctx, path, old, override, images, source, auto_keep, table)

        if override is None and d.problem:
            raise StepFailed(ctx.step_id, f"CLIP selection: {d.problem}",
                             hint=f"lower `min_relative_direction`/`min_direction`/`min_text`/`min_identity` (or raise "
                                  f"`max_identity`/`max_duplicate`), make more candidates, or lower `min_keep`/`count`; "
                                  f"every score is in `{show_path(path)}`")
        if override is not None:
            problem = count_problem(len(m.kept()), p["count"])
            if problem:
                raise ReviewError(ctx.step_id, f"`{show_path(path)}` overrides the CLIP selection, but {problem}",
                                  hint="fix `keep:` in the manifest, or delete it to go back to the automatic decision")
        kept = copy_kept(ctx, source, images, m)  # in the source's order, like a manual selection
        out = [{**img, "scores": table[img["id"]]} for img in kept]
        return {"images": out,
                "decision": {"keep": sorted(e["digest"] for e in out), "by": "hand" if override is not None else "clip",
                             "auto_keep": auto_keep},
                "scores": table,
                "clip": {"model": p["model"], "pretrained": p["pretrained"], **weights_info(p["model"], p["pretrained"])}}

    def _manifest(self, ctx: RunContext, path: Path, old: Manifest | None, override: list[str] | None,
                  images: list[dict[str, Any]], source: Any, auto_keep: list[str],
                  table: dict[str, dict[str, Any]]) -> Manifest:
        """The manifest with the automatic decision and every score (a person's override kept), saved."""
        p = ctx.params
        rel = rel_images(path, ctx.extra.get("source_out_dir"), images)
        auto = {"by": "clip", "model": p["model"], "pretrained": p["pretrained"],
                "checkpoint": str(ctx.inputs["clip_checkpoint"]) if "clip_checkpoint" in ctx.inputs else None,
                **weights_info(p["model"], p["pretrained"]), "score": SCORE_FORMULA,
                "settings": {k: p[k] for k in (*THRESHOLDS, "top_k", "min_keep", "count")},
                "keep": auto_keep}
        if override is None:
            m = Manifest(path, ctx.spec_name, ctx.step_id, ctx.extra.get("source_id", ""), source.key, p["count"],
                         [new_candidate(img, rel) for img in images], auto=auto)
            keep = set(auto_keep)
            for c in m.candidates:
                c.keep = c.digest in keep
        else:  # a person's decision: verify it against the candidates, keep it, refresh the scores
            assert old is not None
            m = old
            reconcile(ctx.step_id, m, images, rel, source.key)  # stale -> ReviewError listing them
            m.auto = auto
            m.count = p["count"]
        by_digest = {img["digest"]: img["id"] for img in images}
        for c in m.candidates:
            c.meta["scores"] = table[by_digest[c.digest]]
        save_manifest(m)  # manifest + contact sheet, also when the step fails afterwards
        return m


def _score_block(sc: EditScore, d: Decision, i: int) -> dict[str, Any]:
    r = (lambda x: None if x is None else round(float(x), 4))
    return {"score": r(d.scores[i]), "formula": sc.formula, "direction": r(sc.direction),
            "text_gain": r(sc.text_gain), "relative": r(d.relative[i]), "text": r(sc.text),
            "identity": r(sc.identity), "passed": d.passed[i], "why": d.why[i]}


def _source_of(img: dict[str, Any]) -> str | None:
    return img.get("source_file") or img.get("source")


def _similarities(ctx: RunContext, source: Any, images: list[dict[str, Any]]) -> tuple[list[EditScore], Any]:
    """Embed the candidates and their source images in one batched pass, each distinct prompt once; the
    scores of every candidate, and the candidate-candidate similarities (with ``max_duplicate``)."""
    from ..metrics.edit_score import score_candidate

    clip = load_step_clip(ctx.params, ctx.inputs.get("clip_checkpoint"), ctx.model)
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
    prompts = sorted({str(t) for img in images for t in (img.get("prompt"), img.get("source_prompt")) if t})
    text_emb = clip.embed_texts(prompts) if prompts else None
    row = {t: i for i, t in enumerate(prompts)}

    def text(t: Any) -> Any:
        return text_emb[row[str(t)]] if t and text_emb is not None else None

    scores = []
    for i, img in enumerate(images):
        rel = img.get("source_file")
        src = srcs[src_files.index(rel)] if rel in src_files else None
        scores.append(score_candidate(cand[i], source=src, prompt=text(img.get("prompt")),
                                      source_prompt=text(img.get("source_prompt"))))
    dup = (cand @ cand.T).tolist() if ctx.params.get("max_duplicate") is not None else None
    return scores, dup


def _has_file(source: Any, rel: str) -> bool:
    try:
        return Path(source.file(rel)).is_file()
    except (KeyError, OSError):
        return False


__all__ = ["SelectClipOp", "Settings", "Decision", "decide", "relative_edits", "SCORE_FORMULA", "FORMULAS",
           "THRESHOLDS"]
