"""A local model's identity hashes exactly the files the pipeline loads, through a digest cache that never
serves a stale digest for a file rewritten within its mtime's resolution (the racy-mtime guard)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from caspec.models import load as L
from caspec.models import tiny as T
from caspec.spec.models import ModelSpec
from caspec.store import hashing as H

# files a real SD 1.5 folder holds that caspec never loads (their content here is garbage: loading one fails)
EXTRAS = ("safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
          "feature_extractor/preprocessor_config.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
          "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
          "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
          "text_encoder/pytorch_model.bin", "model_index.json")


def age(path: Path, seconds: float = 10.0) -> None:
    """Move a file's mtime into the past (out of the racy window), as files at rest are."""
    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


@pytest.fixture()
def folder(tmp_path, caspec_cache) -> Path:
    """A copy of tiny's diffusers folder with the extra files of a real SD 1.5 download, all at rest."""
    dst = tmp_path / "sd"
    shutil.copytree(T.ensure_tiny(), dst)
    for rel in EXTRAS:
        p = dst / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel != "model_index.json":
            p.write_bytes(b"not weights " + rel.encode())
    for p in dst.rglob("*"):
        if p.is_file():
            age(p)
    return dst


def identity(folder: Path) -> dict:
    return L.model_identity(ModelSpec(base=str(folder)), folder.parent)


def test_identity_names_only_the_loaded_files(folder):
    files = identity(folder)["files"]
    assert sorted(files) == [
        "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    # ...and they are what loading reads: every extra file is garbage, yet the folder loads
    pipe = L.load_pipeline(ModelSpec(base=str(folder)), folder.parent, fresh=True)
    assert pipe.unet is not None


def test_changing_files_that_are_not_loaded_keeps_the_identity(folder):
    before = identity(folder)
    for rel in EXTRAS:
        p = folder / rel
        p.write_bytes(p.read_bytes() + b" changed")
        age(p)
    assert identity(folder) == before


def test_changing_a_loaded_file_changes_the_identity(folder):
    before = identity(folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    sched.write_text(json.dumps({**cfg, "steps_offset": 0}))
    age(sched)
    after = identity(folder)
    assert after != before
    assert L.identity_differences(before, after)[0].startswith("scheduler/scheduler_config.json: ")


def test_an_fp16_only_component_is_identified_by_its_fp16_file(folder):
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").replace(unet / "diffusion_pytorch_model.fp16.safetensors")
    (unet / "diffusion_pytorch_model.bin").unlink()
    files = identity(folder)["files"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert not any(f.startswith("unet/") and f.endswith(".bin") for f in files)
    L.load_pipeline(ModelSpec(base=str(folder)), folder.parent, fresh=True)  # and that is what loads


def test_sharded_weights_count_the_index_and_its_shards(tmp_path):
    sub = tmp_path / "unet"
    sub.mkdir()
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                             "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (sub / "diffusion_pytorch_model.bin").write_bytes(b"x")
    assert L.component_weight_files(sub, "diffusers", None) == [
        "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors"]
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "pytorch_model.bin").write_bytes(b"x")
    (te / "model.fp16.safetensors").write_bytes(b"x")
    assert L.component_weight_files(te, "transformers", None) == ["pytorch_model.bin"]
    assert L.component_weight_files(te, "transformers", "fp16") == ["model.fp16.safetensors"]


def test_a_rewrite_within_the_same_mtime_is_not_served_a_stale_digest(folder):
    """A file rewritten with the same size and the same mtime (a quick rewrite on a coarse-clock file
    system) must not keep its cached digest: files this fresh are hashed afresh and never cached."""
    sched = folder / "scheduler" / "scheduler_config.json"
    text = sched.read_text()
    sched.write_text(text)  # just written: inside the racy window
    st = sched.stat()
    first = identity(folder)
    sched.write_text(text.replace('"steps_offset": 1', '"steps_offset": 2'))
    assert sched.stat().st_size == st.st_size
    os.utime(sched, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the bytes differ
    assert identity(folder) != first


def test_digests_of_files_at_rest_are_cached(tmp_path, monkeypatch):
    cache = tmp_path / "digests.json"
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    calls = []
    real = H.sha256_file
    monkeypatch.setattr(H, "sha256_file", lambda p: calls.append(p) or real(p))
    fresh = H.cached_sha256(f, cache)
    assert H.cached_sha256(f, cache) == fresh and len(calls) == 2  # racy: hashed each time, not cached
    assert H.read_digest_cache(cache) == {}
    age(f)
    assert H.cached_sha256(f, cache) == fresh and H.cached_sha256(f, cache) == fresh
    assert len(calls) == 3  # at rest: hashed once more, then served from the cache
    assert H.read_digest_cache(cache)[str(f.resolve())]["sha256"] == fresh
