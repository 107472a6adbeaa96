"""Concept training (paper, section 3.4): multi-token textual inversion, then embeddings + LoRA.

``train_concept`` (:mod:`caspec.train.trainer`) with its settings :class:`TrainConfig` and the
pseudo-words :class:`PseudoWord` (:mod:`caspec.train.config`). The asset it writes is described in
:mod:`caspec.assets.format`. Importing this package does not import torch.
"""
from __future__ import annotations

from typing import Any

from .config import PseudoWord, TrainConfig


def train_concept(*args: Any, **kwargs: Any) -> dict:
    """See :func:`caspec.train.trainer.train_concept` (imported lazily: it pulls in torch)."""
    from .trainer import train_concept as _train

    return _train(*args, **kwargs)


__all__ = ["PseudoWord", "TrainConfig", "train_concept"]
