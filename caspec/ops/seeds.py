"""Per-image seeds, derived from the spec seed and the image's own identity.

``derive_seed(base, *parts)`` = the first 8 bytes (big-endian) of sha256 over the canonical JSON
of ``[base, *parts]``, masked to 63 bits. Root candidate k uses parts ``("root", prompt, k)``;
edit candidates ``("edit", source_digest, prompt, k)``. A seed thus depends only on what the image
is, never on its position in a list: adding candidates, prompts or sources keeps existing images.

This recipe is frozen: changing it changes every image caspec makes (bump the ops' VERSION).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

SEED_MASK = (1 << 63) - 1


def derive_seed(base_seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``base_seed`` and JSON-able ``parts`` (str, int, bool, None, lists)."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, int):
        raise TypeError(f"base_seed must be an int, got {type(base_seed).__name__}")
    payload = json.dumps([base_seed, *parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False)
    digest = hashlib.sha256(payload.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK


__all__ = ["derive_seed", "SEED_MASK"]
