"""bench/train_reference.py at tiny sizes (so it cannot rot) and a check that its reference loop works."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_reference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("caspec_bench_train_reference", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_benchmark_runs_at_tiny_size(bench):
    report = bench.run_benchmark(steps=3, batches=(1,), repeats=1, warmup=0, phase2=True)
    (row,) = report["results"]
    assert row["batch"] == 1
    for key in ("caspec_phase1", "reference", "caspec_phase2"):
        assert len(row[key]) == 1 and row[key][0] > 0 and math.isfinite(row[key][0]), key
    assert row["ratio"] > 0 and math.isfinite(row["ratio"])
    assert row["ratio"] == pytest.approx(row["caspec_phase1_median"] / row["reference_median"])
    assert report["machine"]["torch_threads"] >= 1
    table = bench.markdown(report)
    assert "| 1 |" in table and "×" in table


def test_reference_loop_trains_only_the_new_rows(bench):
    pipe = bench.fresh_pipe()
    words, items = bench.make_words(), bench.make_items()
    base = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ref = bench.ReferenceTI(pipe, words, items, batch_size=2, seed=3)
    weight = pipe.text_encoder.get_input_embeddings().weight
    new_ids = ref.placeholder_ids
    assert weight.shape[0] == base.shape[0] + len(words) and weight.requires_grad
    # the new rows start as the initializer words' rows
    for w, i in zip(words, new_ids):
        init = pipe.tokenizer.encode(w.init_word, add_special_tokens=False)[0]
        assert torch.equal(weight[i], base[init])
    start = weight.detach().clone()
    losses = ref.train(3)
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    after = weight.detach()
    old = torch.ones(after.shape[0], dtype=torch.bool)
    old[torch.tensor(new_ids)] = False
    assert torch.equal(after[old], start[old]), "weight decay / Adam must not move the original rows"
    assert torch.equal(after[: base.shape[0]], base)
    for i in new_ids:
        assert not torch.equal(after[i], start[i]), f"new row {i} did not change"
    # only the embedding table was trainable
    trainable = [p for module in (pipe.text_encoder, pipe.unet, pipe.vae)
                 for p in module.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is weight
