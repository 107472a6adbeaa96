"""What enters a `concepts` step's key: `checkpoint_every` and `preview_every` decide when a run saves and
renders, never the weights, so changing them neither retrains nor orphans a checkpoint (planning only)."""
from __future__ import annotations

import shutil
from pathlib import Path

from caspec.plan.graph import make_plan
from caspec.spec.load import load_spec
from caspec.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent


def demo(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "train-demo").exists():
        shutil.copytree(ROOT / "specs" / "train-demo", folder / "train-demo")
    text = (ROOT / "specs" / "train-demo.yaml").read_text()
    text = text.replace("      checkpoint_every: 20      # a killed run resumes from here\n", extra)
    spec = folder / "train-demo.yaml"
    spec.write_text(text)
    return spec


def train_key(spec: Path) -> str:
    return make_plan(load_spec(spec), LocalStore(spec.parent / ".caspec")).nodes["dancing-robot"].key


def test_checkpoint_and_preview_cadence_stay_out_of_the_key(tmp_path):
    base = train_key(demo(tmp_path))
    for extra in ("      checkpoint_every: 7\n", "      preview_every: 5\n",
                  "      checkpoint_every: 0\n      preview_every: 1\n"):
        assert train_key(demo(tmp_path, extra)) == base, extra
    # a setting that changes the weights does change the key
    assert train_key(demo(tmp_path, "      lr_embeddings: 0.001\n")) != base


def test_timestep_sampling_enters_the_key_only_when_set_apart_from_the_default(tmp_path):
    """`timestep_sampling` came after keys were published: at its default (`uniform`) it is left out, so
    every older training key stays valid; `cubic` makes another key."""
    base = train_key(demo(tmp_path))
    assert train_key(demo(tmp_path, "      timestep_sampling: uniform\n")) == base
    assert train_key(demo(tmp_path, "      timestep_sampling: cubic\n")) != base
    params = make_plan(load_spec(demo(tmp_path)), LocalStore(tmp_path / ".caspec")).nodes["dancing-robot"].params
    assert "timestep_sampling" not in params["train"]
