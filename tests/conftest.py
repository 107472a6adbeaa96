"""Test set-up: offline hub, and one caspec model cache per test session (the tiny model is built once)."""
from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _caspec_cache(tmp_path_factory):
    if "CASPEC_TEST_CACHE" in os.environ:  # reuse a cache across sessions when asked (local speed-up)
        os.environ["CASPEC_CACHE"] = os.environ["CASPEC_TEST_CACHE"]
    else:
        os.environ["CASPEC_CACHE"] = str(tmp_path_factory.mktemp("caspec-cache"))
    os.environ.pop("CASPEC_STORE", None)
    yield
