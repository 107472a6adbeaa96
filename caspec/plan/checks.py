"""What ``caspec validate`` checks beyond the spec's own rules, without running anything or building models.

- Every model the spec names can be found, and its family read from its configs (a typo is an error at its
  ``model:`` line, whose hint lists the embedded models): the same resolution :func:`caspec.plan.graph.build_nodes`
  does for planning.
- Every step prompt fits the text encoder of the model that reads it, counted with that model's tokenizer
  files (:meth:`caspec.families.base.Family.prompt_overflow`), as strictly as a run checks it (CLIP's window
  on every family, FLUX.1 included, for now). Each pseudo-word counts as one token, so a
  prompt reported here is too long for certain; multi-vector pseudo-words are counted exactly when the step
  runs. An embedded model not built yet has no tokenizer files: its prompts are checked when it runs (a note
  says so).

Reads only; imports no torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

#: a pseudo-word as prompts write it (``<robot1>``, ``<A1>``)
PSEUDO_IN_PROMPT = re.compile(r"<[A-Za-z0-9_.{}-]+>")
#: the step fields that hold prompts read by the model's text encoder
PROMPT_FIELDS = ("prompt", "prompts", "negative_prompt")


def check_without_running(loaded: Any) -> list[str]:
    """Raise :class:`~caspec.errors.SpecError` for models that cannot be found and prompts that cannot fit
    (every problem, each at its spec line); return notes on what could not be checked yet."""
    from ..errors import SpecError
    from .graph import build_nodes, model_error_at

    nodes = build_nodes(loaded)  # each step's model and family, errors at the `model:` lines
    problems, notes = [], []
    folders: dict[str, tuple[Any, Path | None]] = {}
    for node in nodes.values():
        if not node.op.USES_MODEL:
            continue
        model = node.model or loaded.spec.model
        where = (node.section, node.id, "model") if node.model else ("model",)
        text = model.model_dump_json()
        if text not in folders:
            with model_error_at(loaded, where):
                folders[text] = _family_and_tokenizers(model, loaded.dir)
        family, folder = folders[text]
        notes += _unknown_words(loaded, node, model.base)
        if folder is None:
            note = f"prompts of `{model.base}`: checked when it runs (the embedded model is built on the first run)"
            if note not in notes:
                notes.append(note)
            continue
        for path, prompt in _prompts(node.params):
            try:
                overflow = family.prompt_overflow(folder, prompt, PSEUDO_IN_PROMPT.findall(prompt))
            except (OSError, ValueError) as exc:  # unreadable tokenizer files: loading the model will say more
                notes.append(f"prompts of `{model.base}`: not checked (its tokenizer files cannot be read: {exc})")
                break
            if overflow is not None:
                from ..models.prompts import HINT

                problems.append(loaded.problem((node.section, node.id, *path),
                                               f"the prompt does not fit the text encoder: {overflow.describe()}",
                                               HINT))
    if problems:
        raise SpecError(problems)
    return notes


def _unknown_words(loaded: Any, node: Any, base: str) -> list[str]:
    """Notes on prompt words a model with a small vocabulary (``toy``) was never trained on."""
    from ..models.load import embedded_vocabulary

    known = embedded_vocabulary(base)
    if known is None:
        return []
    out = []
    for path, prompt in _prompts(node.params):
        unknown = [w for w in dict.fromkeys(PSEUDO_IN_PROMPT.sub(" ", prompt).lower().split()) if w not in known]
        if unknown:
            words = ", ".join(f"`{w}`" for w in unknown)
            out.append(f"{loaded.where((node.section, node.id, *path))}: `{base}` was never trained on {words}: "
                       f"the word{'s' if len(unknown) > 1 else ''} will change the image arbitrarily (it knows: "
                       f"{' '.join(sorted(known))})")
    return out


def _family_and_tokenizers(model: Any, spec_dir: Path) -> tuple[Any, Path | None]:
    """The model's family and the folder holding its tokenizer files (None: not on disk yet)."""
    from .. import families
    from ..models.load import embedded_folder, locate_model, model_family

    family = families.get(model_family(model, spec_dir))
    loc = locate_model(model, spec_dir)
    folder = loc.folder if loc.folder is not None else embedded_folder(loc.kind)
    if not all((folder / sub).is_dir() for sub in family.prompt_tokenizers):
        return family, None
    return family, folder


def _prompts(params: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], str]]:
    for name in PROMPT_FIELDS:
        value = params.get(name)
        if isinstance(value, str) and value:
            yield (name,), value
        elif isinstance(value, list):
            for i, text in enumerate(value):
                if isinstance(text, str) and text:
                    yield (name, i), text


__all__ = ["check_without_running", "PSEUDO_IN_PROMPT", "PROMPT_FIELDS"]
