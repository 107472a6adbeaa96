"""Step kinds: one module per kind. ``get_op(kind)`` returns the op object for a kind.

Op modules must not import torch at module level: planning imports them, and a plan never loads a model.
"""
from __future__ import annotations

from importlib import import_module

from .base import Op

_MODULES = {"root": "generate", "edit": "edit", "select": "select_manual", "train": "train", "compose": "compose", "export": "export", "eval": "eval",
            "select-clip": "select_clip"}
_CLASSES = {"root": "GenerateOp", "edit": "EditOp", "select": "SelectManualOp", "train": "TrainOp", "compose": "ComposeOp", "export": "ExportOp", "eval": "EvalOp",
            "select-clip": "SelectClipOp"}
_cache: dict[str, Op] = {}


def get_op(kind: str) -> Op:
    if kind not in _cache:
        module = import_module(f".{_MODULES[kind]}", __name__)
        _cache[kind] = getattr(module, _CLASSES[kind])()
    return _cache[kind]


__all__ = ["Op", "get_op"]
