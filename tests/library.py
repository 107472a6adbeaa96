"""A concept-library spec on `tiny` for executor tests and benchmarks: ``n`` independent concepts, each
root -> 2 SDEdit variations -> two-phase training."""
from __future__ import annotations

from pathlib import Path

LIBRARY = """version: 1
name: library
model: tiny
defaults: {{seed: 5, steps: {steps}, resolution: 32}}
roots:
{roots}
edits:
{edits}
concepts:
{concepts}
"""


def library_spec(folder: Path, n: int = 4, *, steps: int = 4, train_steps: int = 3, checkpoint_every: int = 0,
                 strength: float = 0.5) -> Path:
    """Write ``folder/library.yaml`` and return its path (3 * n steps)."""
    roots = "\n".join(f'  r{i}: {{prompt: "a photo of a robot number {i}", candidates: 1}}' for i in range(n))
    edits = "\n".join(f'  e{i}: {{from: r{i}, prompts: ["a red robot {i}", "a blue robot {i}"], candidates: 1, '
                      f'strength: {strength}}}' for i in range(n))
    concepts = "\n".join(
        f'  c{i}: {{from: e{i}, words: [{{token: "<a{i}>", init: robot}}, {{token: "<b{i}{{k}}>", init: red}}], '
        f'resolution: 32, train: {{phase1_steps: {train_steps}, phase2_steps: {train_steps}, '
        f'checkpoint_every: {checkpoint_every}}}}}' for i in range(n))
    spec = folder / "library.yaml"
    spec.write_text(LIBRARY.format(steps=steps, roots=roots, edits=edits, concepts=concepts))
    return spec
