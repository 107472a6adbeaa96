"""Test set-up: offline hub, and one caspec model cache per test session (the tiny model is built once)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def caspec_cache(tmp_path_factory):
    """The user cache for the whole session (``CASPEC_TEST_CACHE`` reuses one across sessions)."""
    mp = pytest.MonkeyPatch()
    root = os.environ.get("CASPEC_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "caspec-cache")
    os.makedirs(root, exist_ok=True)
    mp.setenv("CASPEC_CACHE", root)
    mp.delenv("CASPEC_STORE", raising=False)
    yield Path(root)
    mp.undo()
