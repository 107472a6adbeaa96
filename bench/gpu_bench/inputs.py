"""The GPU benchmark's synthetic inputs: the root image to edit, the edit prompts and their seeds, and the
training images with their captions and pseudo-words (deterministic, nothing read from disk)."""
from __future__ import annotations

from typing import Any

COLOURS = ("silver", "purple", "gold", "red", "green", "blue", "orange", "white", "black", "pink")
PALETTE = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30), (200, 60, 200), (30, 200, 200)]


def make_root(resolution: int) -> Any:
    """A deterministic root image: a robot-ish figure of coloured blocks on a gradient."""
    import numpy as np
    from PIL import Image

    r = resolution
    y, x = np.mgrid[0:r, 0:r].astype(np.float32) / max(r - 1, 1)
    a = np.stack([90 + 80 * x, 100 + 60 * y, 140 + 50 * (1 - x)], axis=-1)
    u = r // 16 or 1
    blocks = [((6, 2), (10, 6), 0), ((5, 6), (11, 11), 2), ((3, 6), (5, 10), 1), ((11, 6), (13, 10), 1),
              ((6, 11), (7, 15), 3), ((9, 11), (10, 15), 3)]
    for (x0, y0), (x1, y1), c in blocks:
        a[y0 * u:y1 * u, x0 * u:x1 * u] = PALETTE[c]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="RGB")


def make_items(n: int, resolution: int) -> list[tuple[Any, str]]:
    """``n`` training images (coloured squares on grey) with captions ``a photo of <dance1> <robotK>``."""
    import numpy as np
    from PIL import Image

    out = []
    for k in range(n):
        a = np.full((resolution, resolution, 3), 128, np.uint8)
        lo, hi = resolution // 4 + k % (resolution // 8 or 1), 3 * resolution // 4
        a[lo:hi, lo:hi] = PALETTE[k % len(PALETTE)]
        out.append((Image.fromarray(a, mode="RGB"), f"a photo of <dance1> <robot{k + 1}>"))
    return out


def make_words(n: int) -> list[Any]:
    """The paper's words: one shared ``<dance1>`` (init ``dance``) and ``<robotK>`` per image (init ``robot``)."""
    from caspec.train import PseudoWord

    return [PseudoWord("<dance1>", "dance", "constant")] + [
        PseudoWord(f"<robot{k}>", "robot", "varied") for k in range(1, n + 1)]


def edit_prompts(n: int) -> list[str]:
    return [f"a photo of a dancing {COLOURS[i % len(COLOURS)]} robot" for i in range(n)]


def edit_seeds(root: Any, prompts: list[str], seed: int) -> list[int]:
    """One seed per edit prompt, as caspec's edit step derives them (from the root's pixels)."""
    from caspec.ops.images import pixel_digest
    from caspec.ops.seeds import derive_seed

    digest = pixel_digest(root)
    return [derive_seed(seed, "edit", digest, p, 0) for p in prompts]
