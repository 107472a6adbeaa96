"""Prompts against the text encoder's window: a prompt that does not fit is an error, never a silent cut.

CLIP's text encoder reads 77 positions: a start token, 75 tokens of text, an end token. Tokenizing with
``truncation=True`` silently drops the rest, and a pseudo-word in the dropped part would lose its
embedding while compose still gives its asset's LoRA 0.8 / 0.5. :func:`prompt_overflow` counts a prompt's
tokens (each pseudo-word counts as one, whether or not it was added to the tokenizer yet) and says which
words would be cut off; :func:`check_prompt` raises :class:`PromptTooLong` naming them.

Counting is per whitespace-separated word: CLIP's pre-tokenizer never merges across whitespace, so the
prompt's token count is the sum of its words' counts and each token can be traced to its word.

Pure Python over a loaded tokenizer (no torch import), so ops can check prompts before any work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

SPECIAL_TOKENS = 2  # start and end of text


class PromptTooLong(ValueError):
    """A prompt longer than the text encoder's window (``overflow`` says by how much and what is cut)."""

    def __init__(self, message: str, overflow: "Overflow"):
        super().__init__(message)
        self.overflow = overflow


@dataclass(frozen=True)
class Overflow:
    """How a prompt exceeds the window: ``tokens`` of text for ``limit`` places; the ``cut`` words."""

    tokens: int
    limit: int
    cut: tuple[str, ...]  # words (as written) at least partly beyond the window
    cut_pseudo_words: tuple[str, ...]  # the pseudo-words among the cut words

    def describe(self) -> str:
        """One sentence for an error message."""
        text = (f"it is {self.tokens} tokens long, but the text encoder reads {self.limit} "
                f"({self.limit + SPECIAL_TOKENS} with the start and end tokens)")
        if self.cut_pseudo_words:
            words = ", ".join(f"`{w}`" for w in self.cut_pseudo_words)
            text += (f"; the pseudo-word{'s' if len(self.cut_pseudo_words) > 1 else ''} {words} would be cut off "
                     "(their embeddings lost, while their assets' LoRA would still apply)")
        shown = " ".join(self.cut)
        return text + f"; cut off: \"{shown if len(shown) <= 80 else shown[:77] + '...'}\""


HINT = ("shorten it to fit the window: each pseudo-word counts as one token, a common word about one, a rare "
        "word or a number several; put the pseudo-words early")


def window(tokenizer: Any, text_encoder: Any = None) -> int:
    """Positions the text encoder reads (start and end tokens included): 77 for CLIP."""
    sizes = [int(tokenizer.model_max_length)]
    config = getattr(text_encoder, "config", None)
    if config is not None and getattr(config, "max_position_embeddings", None):
        sizes.append(int(config.max_position_embeddings))
    return min(sizes)


def added_words(tokenizer: Any) -> list[str]:
    """Tokens added to the tokenizer (pseudo-words), without its special tokens."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    get = getattr(tokenizer, "get_added_vocab", None)
    return sorted(t for t in (get() if get else {}) if t not in special)


def _splitter(pseudo_words: Iterable[str]) -> re.Pattern[str] | None:
    words = sorted({w for w in pseudo_words if w}, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(w) for w in words) + ")") if words else None


def _count(tokenizer: Any, word: str, splitter: re.Pattern[str] | None, pseudo: set[str]) -> tuple[int, list[str]]:
    """Tokens of one whitespace-free word, and the pseudo-words in it."""
    parts = splitter.split(word) if splitter else [word]
    n, found = 0, []
    for part in parts:
        if not part:
            continue
        if part in pseudo:
            n, found = n + 1, found + [part]
        else:
            n += len(tokenizer(part, add_special_tokens=False).input_ids)
    return n, found


def prompt_overflow(tokenizer: Any, text: str, *, pseudo_words: Iterable[str] = (), size: int | None = None,
                    text_encoder: Any = None) -> Overflow | None:
    """How ``text`` overflows the window (``size`` positions, default :func:`window`), or None if it fits."""
    pseudo = set(pseudo_words) | set(added_words(tokenizer))
    splitter = _splitter(pseudo)
    limit = (size if size is not None else window(tokenizer, text_encoder)) - SPECIAL_TOKENS
    total, cut, cut_pseudo = 0, [], []
    for word in (text or "").split():
        n, found = _count(tokenizer, word, splitter, pseudo)
        if total + n > limit:
            cut.append(word)
            cut_pseudo += [f for f in found if f not in cut_pseudo]
        total += n
    if total <= limit:
        return None
    return Overflow(tokens=total, limit=limit, cut=tuple(cut), cut_pseudo_words=tuple(cut_pseudo))


def check_prompt(tokenizer: Any, text: str, *, what: str = "the prompt", pseudo_words: Iterable[str] = (),
                 text_encoder: Any = None) -> None:
    """Raise :class:`PromptTooLong` when ``text`` does not fit the text encoder's window."""
    over = prompt_overflow(tokenizer, text, pseudo_words=pseudo_words, text_encoder=text_encoder)
    if over is not None:
        raise PromptTooLong(f"{what} does not fit the text encoder: {over.describe()}", over)


__all__ = ["PromptTooLong", "Overflow", "HINT", "window", "added_words", "prompt_overflow", "check_prompt"]
