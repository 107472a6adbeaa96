"""How well a candidate shows the edit it was asked for: CLIP directional similarity, and its fallbacks.

For an SDEdit candidate ``c`` of source image ``s``, edit prompt ``p`` and source prompt ``q`` (the prompt
the source image was made from), with ``I(.)`` and ``T(.)`` CLIP's unit image and text embeddings:

* ``direction = cos(I(c) - I(s), T(p) - T(q))``: does the image change the way the text changes? The
  measure of StyleGAN-NADA (Gal et al., 2021) and of InstructPix2Pix's evaluation (Brooks et al., 2023).
  It scores the *edit*, not the image: a copy of the source matches its prompt about as well as the source
  does, which is why ``text + identity`` ranked unchanged copies above real edits (identity 0.7-0.97
  dwarfs text 0.2-0.35 with real CLIPs).
* an edit whose prompt embeds as its source's prompt (``|T(p) - T(q)| < NOOP_EPS``) asks for no change: it
  is a **no-op**, with no direction; selection never keeps it while real edits pass.
* ``text_gain = cos(I(c), T(p)) - cos(I(s), T(p))`` (how much better the candidate matches its prompt than
  its source did) stands in for ``direction`` when the source's prompt is unknown (a user-given root image).
* ``text = cos(I(c), T(p))`` and ``identity = cos(I(c), I(s))`` are kept for thresholds and for the person
  reading the manifest; candidates of a ``roots`` step have only ``text``.

:class:`EditScore` holds them; :func:`score_candidate` computes them from embeddings. Pure; torch is only
needed for the embeddings passed in (any object with ``@`` and ``.norm()``, e.g. torch tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NOOP_EPS = 1e-4
"""Text directions shorter than this (unit text embeddings) count as no change asked for."""

FORMULAS = {
    "direction": "cos(I(c) - I(s), T(p) - T(q)): CLIP directional similarity",
    "text_gain": "cos(I(c), T(p)) - cos(I(s), T(p)): the source's prompt is unknown",
    "noop": "none: the edit prompt is the source's prompt (no edit asked for)",
    "text": "cos(I(c), T(p)): a root candidate (no source image)",
}
"""What each kind of score is (``EditScore.formula`` -> its definition), as written into manifests."""


@dataclass(frozen=True)
class EditScore:
    """One candidate's CLIP similarities (None where they do not apply) and what it is ranked by."""

    text: float | None = None
    identity: float | None = None
    direction: float | None = None
    text_gain: float | None = None
    noop: bool = False

    @property
    def formula(self) -> str:
        """``direction``, ``text_gain``, ``noop`` (an edit asking for no change) or ``text`` (a root)."""
        if self.noop:
            return "noop"
        if self.direction is not None:
            return "direction"
        if self.text_gain is not None:
            return "text_gain"
        return "text"

    @property
    def edit(self) -> float | None:
        """How well the asked-for change shows: ``direction``, else ``text_gain``; None for roots and no-ops."""
        if self.noop:
            return None
        return self.direction if self.direction is not None else self.text_gain

    @property
    def score(self) -> float:
        """The ranking score: ``edit`` for edit candidates, ``text`` for roots and no-ops (0 if unknown)."""
        value = self.edit if self.edit is not None else self.text
        return float(value) if value is not None else 0.0


def _cos(a: Any, b: Any) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float((a @ b) / (na * nb))


def directional_similarity(cand: Any, source: Any, prompt: Any, source_prompt: Any) -> float | None:
    """``cos(cand - source, prompt - source_prompt)`` of unit embeddings; None when the text does not
    change (a no-op edit). An image identical to its source scores 0."""
    text_dir = prompt - source_prompt
    if float(text_dir.norm()) < NOOP_EPS:
        return None
    return _cos(cand - source, text_dir)


def score_candidate(cand: Any, *, source: Any | None = None, prompt: Any | None = None,
                    source_prompt: Any | None = None) -> EditScore:
    """The :class:`EditScore` of unit embedding ``cand``, given what is known: its source image's embedding,
    its prompt's, and its source's prompt's (each None when unknown)."""
    text = float(cand @ prompt) if prompt is not None else None
    if source is None:
        return EditScore(text=text)
    identity = float(cand @ source)
    if prompt is None:
        return EditScore(text=None, identity=identity)
    if source_prompt is not None:
        direction = directional_similarity(cand, source, prompt, source_prompt)
        return EditScore(text=text, identity=identity, direction=direction, noop=direction is None)
    return EditScore(text=text, identity=identity, text_gain=text - float(source @ prompt))


__all__ = ["EditScore", "score_candidate", "directional_similarity", "NOOP_EPS", "FORMULAS"]
