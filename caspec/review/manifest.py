"""Review manifests: the YAML file where a person marks which candidates of a step to keep.

A manifest lists every candidate of the reviewed step (id, content digest, image path, prompt, seed)
with ``keep: true|false``. Its *decision* (the sorted digests kept) enters the select step's cache key,
so editing the manifest is what lets a paused run go on. A manifest may be pre-filled by hand or shipped
with a recipe: entries with an ``id`` and ``keep`` but no ``digest`` are resolved against the candidates
(and their digests written in) once those exist. Writes are atomic (temp file + os.replace).

A ``select`` step with ``by: clip`` writes the same format with ``keep`` already decided, each
candidate's CLIP ``scores``, and a top-level ``auto`` block recording the automatic decision
(``auto.keep``: the sorted digests CLIP kept; ``auto.warning`` when the CLIP has random weights, also shown
on the contact sheet). A ``keep`` set that differs from ``auto.keep`` is a person's override.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ReviewError
from ..fsutil import atomic_write_text

MANIFEST_VERSION = 1

HEADER = """\
# caspec review manifest for step `{step}` of spec `{spec}`.
# Mark `keep: true` on the candidates to keep{count_note}, save, then re-run `caspec run`.
# Contact sheet: {sheet}
# Or from a script: caspec review SPEC --step {step} --keep ID [ID...]
"""

AUTO_HEADER = """\
# caspec selection manifest for step `{step}` of spec `{spec}`: decided by CLIP (see each candidate's `scores`).
# To override, change `keep:` on the candidates{count_note} and re-run `caspec run`: a `keep` set that differs
# from `auto.keep` (the automatic decision) replaces it and re-runs the step. Contact sheet: {sheet}
"""


@dataclass
class Candidate:
    id: str
    digest: str
    image: str
    keep: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> dict[str, Any]:
        return {"id": self.id, "keep": self.keep, "digest": self.digest, "image": self.image, **self.meta}


@dataclass
class Manifest:
    path: Path
    spec: str
    step: str
    source: str
    source_key: str | None
    count: int | None
    candidates: list[Candidate]
    # automatic selection (`by: clip`): {"by": "clip", "keep": [sorted digests], ...}; None for manual reviews
    auto: dict[str, Any] | None = None

    @property
    def auto_keep(self) -> list[str] | None:
        """The sorted digests the automatic selection kept, or None if no automatic selection wrote this."""
        if not self.auto or not isinstance(self.auto.get("keep"), list):
            return None
        return sorted(str(d) for d in self.auto["keep"])

    def kept(self) -> list[Candidate]:
        return [c for c in self.candidates if c.keep]

    def decision(self, digests_by_id: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Sorted kept digests; entries without a digest are looked up by id in ``digests_by_id``.
        None when some kept entry cannot be resolved yet (its candidates do not exist yet)."""
        out = []
        for c in self.kept():
            digest = c.digest or (digests_by_id or {}).get(c.id)
            if not digest:
                return None
            out.append(digest)
        return {"keep": sorted(out)}

    def by_id(self) -> dict[str, Candidate]:
        return {c.id: c for c in self.candidates}


def sheet_path(manifest_path: Path) -> Path:
    return manifest_path.with_suffix(".html")


def _fail(path: Path, message: str, step: str = "") -> ReviewError:
    return ReviewError(step, f"{path}: {message}", hint="fix the manifest by hand, or delete it to start a fresh review")


def read_manifest(path: Path) -> Manifest | None:
    """Parse a manifest; None if the file does not exist. Malformed content raises ReviewError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise _fail(path, f"invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
        raise _fail(path, "expected a mapping with a `candidates` list")
    cands = [_candidate(path, i, c) for i, c in enumerate(data["candidates"])]
    auto = data.get("auto")
    if auto is not None and not isinstance(auto, dict):
        raise _fail(path, "`auto` should be a mapping")
    return Manifest(path=path, spec=str(data.get("spec", "")), step=str(data.get("step", "")),
                    source=str(data.get("source", "")), source_key=data.get("source_key"),
                    count=data.get("count"), candidates=cands, auto=auto)


def _candidate(path: Path, i: int, raw: Any) -> Candidate:
    if not isinstance(raw, dict):
        raise _fail(path, f"candidates[{i}] should be a mapping")
    if not isinstance(raw.get("id"), str) or not raw["id"]:
        raise _fail(path, f"candidates[{i}].id is missing")
    if not isinstance(raw.get("digest", ""), str):
        raise _fail(path, f"candidates[{i}].digest should be a string")
    keep = raw.get("keep", False)
    if not isinstance(keep, bool):
        raise _fail(path, f"candidates[{i}].keep should be true or false, not {keep!r}")
    meta = {k: v for k, v in raw.items() if k not in ("id", "digest", "image", "keep")}
    return Candidate(id=raw["id"], digest=raw.get("digest") or "", image=str(raw.get("image", "")), keep=keep, meta=meta)


def write_manifest(m: Manifest) -> None:
    """Write atomically, with a header telling the person what to do."""
    m.path.parent.mkdir(parents=True, exist_ok=True)
    count_note = f" (exactly {m.count})" if m.count else ""
    header = HEADER if m.auto is None else AUTO_HEADER
    head = header.format(step=m.step, spec=m.spec, count_note=count_note, sheet=sheet_path(m.path).name)
    body = {"version": MANIFEST_VERSION, "spec": m.spec, "step": m.step, "source": m.source,
            "source_key": m.source_key, "count": m.count}
    if m.auto is not None:
        body["auto"] = m.auto
    body["candidates"] = [c.to_yaml() for c in m.candidates]
    text = head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=120)
    atomic_write_text(m.path, text)


def write_contact_sheet(m: Manifest) -> Path:
    """A static HTML page showing every candidate with its id, prompt and seed (kept ones outlined)."""
    cells = []
    for c in m.candidates:
        border = "4px solid #2a2" if c.keep else "4px solid transparent"
        cap = html.escape(f"{c.id} · seed {c.meta.get('seed', '?')}")
        prompt = html.escape(str(c.meta.get("prompt", "")))
        scores = c.meta.get("scores")
        if isinstance(scores, dict):  # automatic selection: its scores and why
            shown = " · ".join(f"{k} {scores[k]}" for k in ("score", "direction", "text_gain", "text", "identity")
                               if scores.get(k) is not None)
            prompt += f"<br><small>{html.escape(shown)}<br>{html.escape(str(scores.get('why', '')))}</small>"
        cells.append(f'<figure style="margin:6px;width:200px"><img src="{html.escape(c.image)}" '
                     f'style="width:192px;image-rendering:pixelated;border:{border}"><figcaption>'
                     f'<b>{cap}</b><br><small>{prompt}</small></figcaption></figure>')
    page = (f"<!doctype html><meta charset=utf-8><title>review {html.escape(m.spec)}/{html.escape(m.step)}</title>"
            f"<body style='font-family:sans-serif'><h1>Review `{html.escape(m.step)}` of `{html.escape(m.spec)}`</h1>"
            + (f"<p style='color:#b00'><b>{html.escape(str(m.auto['warning']))}</b></p>"
               if m.auto is not None and m.auto.get("warning") else "")
            + (f"<p>Decided by CLIP (kept ones outlined); change <code>keep</code> in "
               f"<code>{html.escape(m.path.name)}</code> to override, then re-run <code>caspec run</code>.</p>"
               if m.auto is not None else
               f"<p>Mark <code>keep: true</code> in <code>{html.escape(m.path.name)}</code>"
               f"{' for exactly ' + str(m.count) if m.count else ''}, then re-run <code>caspec run</code>.</p>")
            + f"<div style='display:flex;flex-wrap:wrap'>{''.join(cells)}</div></body>")
    out = sheet_path(m.path)
    atomic_write_text(out, page)
    return out


def match_ids(m: Manifest, wanted: list[str]) -> tuple[list[Candidate], list[str]]:
    """Resolve ids, digest prefixes (6+ hex chars) or `all` to candidates; returns (found, unknown)."""
    found: list[Candidate] = []
    unknown: list[str] = []
    ids = m.by_id()
    for w in wanted:
        if w == "all":
            found.extend(m.candidates)
        elif w in ids:
            found.append(ids[w])
        else:
            hits = [c for c in m.candidates if len(w) >= 6 and c.digest and c.digest.startswith(w)]
            found.extend(hits) if len(hits) == 1 else unknown.append(w)
    return found, unknown
