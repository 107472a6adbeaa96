"""Run-time prompt checks shared by the ops: a prompt longer than the text encoder's window fails the step
with its spec position and a hint, before any work (the tokenizer is only there once the model is loaded).

No torch at module level: planning imports the ops that import this module.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..errors import StepFailed
from .base import RunContext

Field = tuple[tuple[Any, ...], str]  # (path inside the step, e.g. ("prompts", 2); the prompt text)


def label(section: str, step_id: str, path: Sequence[Any]) -> str:
    """``compose.story.prompts[2]``: the dotted spec path of a step field."""
    text = f"{section}.{step_id}"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def check_prompts(ctx: RunContext, pipe: Any, section: str, fields: Iterable[Field],
                  pseudo_words: Iterable[str] = (), expansions: Mapping[str, Sequence[str]] | None = None) -> None:
    """Fail the step at the first prompt in ``fields`` that does not fit ``pipe``'s text encoder.

    A multi-vector pseudo-word counts as its sub-tokens (``expansions``, default ``pipe.expansions``)."""
    from ..models.prompts import HINT, PromptTooLong, check_prompt
    from ..models.text import expand_text

    where = ctx.extra.get("where", lambda *path: "")
    expansions = dict(getattr(pipe, "expansions", {}) or {}) if expansions is None else dict(expansions)
    words = list(pseudo_words) + [t for subs in expansions.values() for t in subs]
    seen: set[str] = set()
    for path, text in fields:
        if not text or text in seen:
            continue
        seen.add(text)
        try:
            check_prompt(pipe.tokenizer, expand_text(text, expansions), what="the prompt", pseudo_words=words,
                         text_encoder=pipe.text_encoder)
        except PromptTooLong as exc:
            at = where(*path)
            raise StepFailed(ctx.step_id, f"{at + ': ' if at else ''}{label(section, ctx.step_id, path)}: {exc}",
                             hint=HINT) from None


def negative_field(params: dict[str, Any]) -> list[Field]:
    """The step's negative prompt (its own, or the defaults')."""
    return [(("negative_prompt",), params.get("negative_prompt") or "")]


__all__ = ["check_prompts", "negative_field", "label"]
