"""How prompts condition the UNet, for every family: tokenizing, encoding, and SDXL's added conditions.

Sampling and training share these functions, so the text a model is trained on and the text it is
prompted with go through the same code:

* :func:`expand_prompt` replaces each multi-vector pseudo-word by its sub-tokens (``<w>`` ->
  ``<w> <w>_1 <w>_2``, diffusers' ``maybe_convert_prompt`` convention; ``pipe.expansions``);
* :func:`tokenize` gives the token ids for each text encoder (SDXL: both tokenizers);
* :func:`encode_ids` runs the text encoders (with gradients when the caller allows them): SD 1.x/2.x use
  the last hidden state; SDXL concatenates both encoders' penultimate hidden states and takes the pooled
  (projected) embedding of the second, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does;
* :func:`added_cond` builds SDXL's ``added_cond_kwargs``: the pooled text and the six time ids
  (original size, crop top-left, target size), here the square image size, no crop.

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
    """Run the text encoders on :func:`tokenize`'s output (gradients follow the caller's grad mode)."""
    device = pipe.device
    if pipe.family != "sdxl":
        input_ids, mask = ids[0]
        out = pipe.text_encoder(input_ids.to(device), attention_mask=None if mask is None else mask.to(device))[0]
        return TextCond(out.to(dtype=pipe.dtype))
    hidden, pooled = [], None
    for (_, _, te), (input_ids, _mask) in zip(pipe.text_encoders, ids):
        out = te(input_ids.to(device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled embedding
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("the SDXL model's second text encoder gives no pooled (projected) embedding")
    dtype = pipe.text_encoder_2.dtype
    return TextCond(torch.cat(hidden, dim=-1).to(dtype=dtype), pooled.to(dtype=dtype))


def time_ids(resolution: int, n: int, *, dtype: Any, device: Any) -> torch.Tensor:
    """SDXL's added time ids ``[n, 6]``: original size, crop top-left (0, 0), target size."""
    row = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype, device=device)
    return row.repeat(n, 1)


def added_cond(pipe: Any, cond: TextCond, resolution: int) -> dict[str, torch.Tensor] | None:
    """The UNet's ``added_cond_kwargs`` for SDXL (None for other families)."""
    if pipe.family != "sdxl":
        return None
    if cond.pooled is None:
        raise ValueError("SDXL conditioning needs the pooled text embedding")
    return {"text_embeds": cond.pooled.to(pipe.device),
            "time_ids": time_ids(resolution, len(cond), dtype=cond.embeds.dtype, device=pipe.device)}


__all__ = ["TextCond", "sub_tokens", "expand_text", "expand_prompt", "tokenize", "encode_ids", "time_ids", "added_cond"]
