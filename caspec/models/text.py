"""How prompts condition the denoiser, for every family: tokenizing, then encoding as the family says.

Sampling and training share these functions, so the text a model is trained on and the text it is
prompted with go through the same code:

* :func:`expand_prompt` replaces each multi-vector pseudo-word by its sub-tokens (``<w>`` ->
  ``<w> <w>_1 <w>_2``, diffusers' ``maybe_convert_prompt`` convention; ``pipe.expansions``);
* :func:`tokenize` gives the token ids for each text encoder (SDXL: both tokenizers);
* :func:`encode_ids` runs the text encoders (with gradients when the caller allows them) as the pipe's
  family does (:meth:`caspec.families.base.Family.encode`: SD 1.x/2.x the last hidden state, SDXL both
  encoders and a pooled embedding);
* :func:`added_cond` gives the family's extra conditioning (SDXL's pooled text and time ids).

:class:`TextCond` carries the hidden states and (SDXL) the pooled embedding through batching.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


@dataclass
class TextCond:
    """Text conditioning for a batch: ``embeds`` ``[N, L, D]`` and, for SDXL, ``pooled`` ``[N, P]``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def __getitem__(self, sel: Any) -> "TextCond":
        if isinstance(sel, int):
            sel = slice(sel, sel + 1)
        return TextCond(self.embeds[sel], None if self.pooled is None else self.pooled[sel])

    @staticmethod
    def cat(conds: Sequence["TextCond"]) -> "TextCond":
        pooled = [c.pooled for c in conds]
        return TextCond(torch.cat([c.embeds for c in conds]),
                        None if any(p is None for p in pooled) else torch.cat(pooled))  # type: ignore[arg-type]

    def pad(self, size: int) -> "TextCond":
        """Padded to ``size`` rows with copies of the last one (see sampling's ``PAD_BATCHES``)."""
        n = len(self)
        if n >= size:
            return self
        return TextCond.cat([self, *[self[n - 1]] * (size - n)])

    def zeros(self) -> "TextCond":
        return TextCond(torch.zeros_like(self.embeds), None if self.pooled is None else torch.zeros_like(self.pooled))

    def to(self, dtype: Any) -> "TextCond":
        return TextCond(self.embeds.to(dtype=dtype), None if self.pooled is None else self.pooled.to(dtype=dtype))

    # comparisons in tests and callers that only need the hidden states
    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape


def sub_tokens(token: str, vectors: int) -> list[str]:
    """The tokens a pseudo-word of ``vectors`` vectors occupies: ``<w>``, ``<w>_1``, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, int(vectors))]


def expand_text(text: str, expansions: Mapping[str, Sequence[str]]) -> str:
    """``text`` with every pseudo-word in ``expansions`` replaced by its sub-tokens, space-separated."""
    expansions = {w: list(subs) for w, subs in (expansions or {}).items() if len(subs) > 1}
    if not expansions or not text:
        return text
    words = sorted(expansions, key=len, reverse=True)
    pattern = re.compile("(?:" + "|".join(re.escape(w) for w in words) + r")(?!_\d)")
    return pattern.sub(lambda m: " ".join(expansions[m.group(0)]), text)


def expand_prompt(pipe: Any, text: str) -> str:
    """``text`` with every multi-vector pseudo-word replaced by its sub-tokens (``pipe.expansions``)."""
    return expand_text(text, getattr(pipe, "expansions", None) or {})


def tokenize(pipe: Any, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(input ids [N, 77], attention mask or None)`` per text encoder, for already expanded ``texts``."""
    out = []
    for _, tok, te in pipe.text_encoders:
        enc = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = enc.attention_mask if getattr(te.config, "use_attention_mask", False) else None
        out.append((enc.input_ids, mask))
    return out


def encode_ids(pipe: Any, ids: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> TextCond:
    """Run the text encoders on :func:`tokenize`'s output, as the pipe's family does (gradients follow the
    caller's grad mode)."""
    return pipe.kind.encode(pipe, ids)


def added_cond(pipe: Any, cond: TextCond, resolution: int) -> dict[str, torch.Tensor] | None:
    """The denoiser's extra conditioning for ``cond`` (SDXL's ``added_cond_kwargs``; None for other families)."""
    return pipe.kind.added_cond(pipe, cond, resolution)


__all__ = ["TextCond", "sub_tokens", "expand_text", "expand_prompt", "tokenize", "encode_ids", "added_cond"]
