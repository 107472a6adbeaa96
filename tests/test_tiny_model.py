"""The embedded `tiny` model, model identities and pipeline loading (caspec.models.tiny / .load)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from caspec.errors import ModelError  # noqa: E402
from caspec.models import load as L  # noqa: E402
from caspec.models import tiny as T  # noqa: E402
from caspec.spec.models import ModelSpec  # noqa: E402




@pytest.fixture(scope="session")
def tiny_folder(caspec_cache) -> Path:
    return T.ensure_tiny()


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- tiny ---------------------------------------------------------------------------------------


def test_tiny_identity_is_pure_and_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("CASPEC_CACHE", str(tmp_path / "cache"))
    ident = T.tiny_identity()
    assert ident == T.tiny_identity()
    assert ident["tiny_version"] == T.TINY_VERSION
    assert isinstance(T.TINY_VERSION, int)
    assert ident["seed"] == T.TINY_SEED
    assert ident["torch"] and ident["torch"] != "unknown"
    assert ident["unet"]["block_out_channels"] == [32, 64]
    json.dumps(ident)  # JSON-able
    assert not (tmp_path / "cache").exists()  # builds nothing


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CASPEC_CACHE", str(tmp_path / "a"))
    assert T.cache_root() == tmp_path / "a"
    monkeypatch.delenv("CASPEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert T.cache_root() == tmp_path / "x" / "caspec"
    assert T.tiny_dir() == tmp_path / "x" / "caspec" / "models" / f"tiny-v{T.TINY_VERSION}"


def test_ensure_tiny_builds_a_diffusers_folder_once(tiny_folder, caspec_cache):
    assert tiny_folder == caspec_cache / "models" / f"tiny-v{T.TINY_VERSION}"
    for rel in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (tiny_folder / rel).is_file(), rel
    stamp = (tiny_folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert T.ensure_tiny() == tiny_folder
    assert (tiny_folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in tiny_folder.parent.iterdir() if p.name.startswith(".tiny") and p.is_dir()]
    assert leftovers == []
    sched = json.loads((tiny_folder / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert (sched["clip_sample"], sched["set_alpha_to_one"], sched["steps_offset"]) == (False, False, 1)


def test_two_fresh_builds_give_identical_bytes(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CASPEC_CACHE", str(tmp_path / "fresh"))
    other = T.ensure_tiny()
    assert other != tiny_folder
    a, b = _tree_bytes(tiny_folder), _tree_bytes(other)
    assert sorted(a) == sorted(b)
    weights = [k for k in a if k.endswith(".safetensors")]
    assert len(weights) == 3
    for k in a:
        assert a[k] == b[k], k


def test_half_built_folder_is_rebuilt(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CASPEC_CACHE", str(tmp_path / "c"))
    target = T.tiny_dir()
    shutil.copytree(tiny_folder, target)
    (target / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # an interrupted copy
    assert T.ensure_tiny() == target
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_tokenizer_is_real_clip_bpe(tiny_folder):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer", local_files_only=True)
    assert tok.model_max_length == 77
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# -- identity ----------------------------------------------------------------------------------


def test_identity_tiny_includes_dtype_not_device(tmp_path):
    a = L.model_identity(ModelSpec(base="tiny", dtype="fp32", device="cpu"), tmp_path)
    b = L.model_identity(ModelSpec(base="tiny", dtype="fp32", device="cuda"), tmp_path)
    c = L.model_identity(ModelSpec(base="tiny", dtype="fp16", device="cpu"), tmp_path)
    assert a["kind"] == "tiny" and a["tiny_version"] == T.TINY_VERSION
    assert a == b
    assert a != c
    assert L.model_identity(ModelSpec(base="tiny", device="cpu"), tmp_path)["dtype"] == "fp32"


def test_identity_local_folder_hashes_files_and_caches_digests(tiny_folder, tmp_path, monkeypatch, caspec_cache):
    import time

    from caspec.store import hashing as H

    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    local = tmp_path / "models" / "mine"
    shutil.copytree(tiny_folder, local)
    past = time.time_ns() - 10**10  # files at rest (digests of files changed in the last 2 s are never cached)
    for p in local.rglob("*"):
        os.utime(p, ns=(past, past))
    ident = L.model_identity(ModelSpec(base="../models/mine", device="cpu"), spec_dir)
    assert ident["kind"] == "local" and ident["dtype"] == "fp32"
    assert set(ident["files"]) >= {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                   "tokenizer/tokenizer_config.json"}
    assert "model_index.json" not in ident["files"]  # caspec loads each component itself
    import hashlib
    assert ident["files"]["unet/config.json"] == hashlib.sha256((local / "unet/config.json").read_bytes()).hexdigest()
    digests = json.loads((caspec_cache / "digests.json").read_text())["files"]
    assert str((local / "unet/config.json").resolve()) in digests

    # re-planning is served from the digest cache: nothing is hashed again
    def boom(path):
        raise AssertionError(f"hashed again: {path}")

    monkeypatch.setattr(H, "sha256_file", boom)
    assert L.model_identity(ModelSpec(base=str(local), device="cpu"), tmp_path / "elsewhere") == ident
    # an absolute path and a moved folder with the same bytes have the same identity; a changed file differs
    monkeypatch.undo()
    cfg = local / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace('"sample_size": 32', '"sample_size": 32 '))
    changed = L.model_identity(ModelSpec(base=str(local), device="cpu"), tmp_path)
    assert changed["files"]["unet/config.json"] != ident["files"]["unet/config.json"]


def test_identity_folder_without_model_index(tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        L.model_identity(ModelSpec(base="notamodel"), tmp_path)


def _fake_hub(root: Path, repo: str, commit: str, ref: str = "main") -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / ref).write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    return snap


def test_identity_hub_id_pins_commit_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub(tmp_path / "hub", "org/model", commit)
    ident = L.model_identity(ModelSpec(base="org/model", device="cpu"), tmp_path)
    assert ident == {"kind": "hub", "repo": "org/model", "commit": commit, "dtype": "fp32"}
    # a commit revision whose snapshot exists is used as is
    ident2 = L.model_identity(ModelSpec(base="org/model", revision=commit, device="cpu"), tmp_path)
    assert ident2["commit"] == commit
    with pytest.raises(ModelError, match="not available offline"):
        L.model_identity(ModelSpec(base="org/model", revision="v2", device="cpu"), tmp_path)


def test_identity_hub_id_missing_offline_has_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelError) as err:
        L.model_identity(ModelSpec(base="stable-diffusion-v1-5/stable-diffusion-v1-5"), tmp_path)
    text = err.value.render()
    assert "not available offline" in text
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in text
    assert "model.base" in text


def test_native_resolution(tmp_path):
    assert L.native_resolution(ModelSpec(), tmp_path) == 64


# -- loading -------------------------------------------------------------------------------------


def test_load_pipeline_tiny_is_cached_per_process(tmp_path):
    import torch

    spec = ModelSpec(base="tiny", device="cpu")
    pipe = L.load_pipeline(spec, tmp_path)
    assert L.load_pipeline(ModelSpec(base="tiny", device="cpu", dtype="fp32"), tmp_path / "x") is pipe
    assert pipe.resolution == 64 and pipe.vae_scale_factor == 2
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32
    assert pipe.vae_dtype == torch.float32
    assert pipe.tokenizer.model_max_length == 77
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_load_pipeline_broken_folder_is_a_model_error(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError) as err:
        L.load_pipeline(ModelSpec(base=str(broken), device="cpu"), tmp_path)
    assert "unet" in err.value.message and err.value.hint


def test_load_pipeline_local_folder_bf16_keeps_vae_fp32(tiny_folder, tmp_path):
    import torch

    pipe = L.load_pipeline(ModelSpec(base=str(tiny_folder), device="cpu", dtype="bf16"), tmp_path)
    assert pipe.dtype == torch.bfloat16
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    assert pipe.vae_dtype == torch.float32
    assert pipe.identity["kind"] == "local"


def test_planning_side_imports_no_torch(tmp_path):
    """Ops modules and model_identity must not import torch (planning never loads a model)."""
    import subprocess
    import sys

    code = ("import sys; import caspec.ops.generate, caspec.ops.edit, caspec.ops.seeds, caspec.ops.images\n"
            "from pathlib import Path\nfrom caspec.models.load import model_identity, native_resolution\n"
            "from caspec.spec.models import ModelSpec\n"
            "m = ModelSpec(base='tiny', device='cpu'); model_identity(m, Path('.')); native_resolution(m, Path('.'))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_device_auto_without_visible_gpus_is_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert L.resolve_device(ModelSpec()) == "cpu"
    assert L.resolve_dtype(ModelSpec()) == "fp32"
    assert L.resolve_dtype(ModelSpec(device="cuda")) == "fp16"


def test_load_pipeline_from_local_hub_cache(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snap = _fake_hub(tmp_path / "hub", "someone/tiny-sd", commit)
    shutil.rmtree(snap)
    shutil.copytree(tiny_folder, snap)
    pipe = L.load_pipeline(ModelSpec(base="someone/tiny-sd", device="cpu"), tmp_path)
    assert pipe.identity == {"kind": "hub", "repo": "someone/tiny-sd", "commit": commit, "dtype": "fp32"}
    assert pipe.resolution == 64
