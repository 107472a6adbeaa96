"""The GPU benchmark of issue 7 (bench/gpu_bench/, bench/gpu.py) at tiny size on the CPU, so that
the code a GPU session runs in its few minutes cannot rot: every section runs, its figures are real, its
ratios are the reported numbers' ratios, the markdown shows every figure, and the reference training
patterns do what the scripts they stand for do."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:  # the harness is the package bench/gpu_bench, imported as bench/gpu.py does
    sys.path.append(str(ROOT / "bench"))  # appended: bench/'s scripts shadow nothing

import gpu_bench as G  # noqa: E402

pytestmark = pytest.mark.slow


def _settings(**kw):
    return G.settings_for("tiny", "cpu", quick=True, sdedit_steps=8, phase1_steps=3, phase2_steps=3, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    seen: list[list[str]] = []
    state = torch.random.get_rng_state()
    report = G.run_benchmark(_settings(), command="pytest tests/test_bench_gpu.py",
                             on_section=lambda r: seen.append(sorted(r)),
                             work_dir=tmp_path_factory.mktemp("gpu-bench"))
    report["meta"]["rng_untouched"] = torch.equal(state, torch.random.get_rng_state())
    return report, seen


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _errors(report) -> list[str]:
    out = [f"{k}: {v['error']}" for k, v in report.items() if isinstance(v, dict) and "error" in v]
    for row in report.get("train", {}).get("rows", []):
        out += [f"train p{row['phase']} b{row['batch']} {side}: {row[side]['error']}"
                for side in ("caspec", "reference") if "error" in row[side]]
    return out


def test_every_section_runs_without_errors(run):
    report, seen = run
    assert report["meta"]["rng_untouched"]
    assert not _errors(report), _errors(report)
    for key in ("meta", "build", "sdedit", "train", "e2e_cold", "e2e_warm", "matmul"):
        assert key in report, key
    m = report["meta"]
    assert m["size"] == "tiny" and m["device"] == "cpu" and m["card"] and m["command"] == "pytest tests/test_bench_gpu.py"
    assert m["versions"]["torch"] and m["versions"]["diffusers"] and _positive(m["total_s"])
    # on_section saw the report grow: after the build, then after every section
    assert seen[0] == ["build", "meta"] and "e2e_warm" in seen[-1] and len(seen) >= 6
    json.dumps(report)  # plain JSON, no objects


def test_sdedit_figures_and_ratio(run):
    sd = run[0]["sdedit"]
    assert sd["variations"] == 8 and sd["denoising_steps"] == int(8 * 0.86) and sd["guidance_scale"] == 7.5
    for side in ("caspec", "reference"):
        r = sd[side]
        assert len(r["runs_s"]) == sd["repeats"] and all(_positive(x) for x in r["runs_s"] + [r["warmup_s"]])
        assert r["median_s"] == statistics.median(r["runs_s"])
        assert r["images_per_s"] == pytest.approx(sd["variations"] / r["median_s"])
    assert sd["ratio_images_per_s"] == pytest.approx(sd["caspec"]["images_per_s"] / sd["reference"]["images_per_s"])


def test_training_rows(run):
    tr = run[0]["train"]
    rows = tr["rows"]
    assert [(r["phase"], r["batch"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    total = tr["warmup_steps"] + tr["timed_steps"] + 1
    for row in rows:
        for side in ("caspec", "reference"):
            r = row[side]
            for key in ("samples_per_s", "step_ms", "timed_s", "flops_per_step", "gflop_per_sample", "effective_tflops",
                        "fraction_of_matmul", "run_s"):
                assert _positive(r[key]), (row["phase"], row["batch"], side, key, r[key])
            assert r["samples_per_s"] == pytest.approx(row["batch"] * r["timed_steps"] / r["timed_s"])
            assert r["step_ms"] == pytest.approx(1000 * r["timed_s"] / r["timed_steps"])
            assert len(r["losses"]) == total and all(math.isfinite(x) and x > 0 for x in r["losses"])
            assert r["peak_mem_bytes"] is None  # CUDA only
            assert r["fraction_of_matmul"] == pytest.approx(r["effective_tflops"] / run[0]["matmul"]["tflops"])
        assert row["ratio_samples_per_s"] == pytest.approx(row["caspec"]["samples_per_s"] / row["reference"]["samples_per_s"])
        assert row["ratio_peak_mem"] is None
    # the same model does the same work per sample whatever the batch size
    for phase in (1, 2):
        a, b = [r["caspec"]["gflop_per_sample"] for r in rows if r["phase"] == phase]
        assert a == pytest.approx(b, rel=0.02)
    # the references VAE-encode every step, caspec caches latents: the reference counts more FLOPs per sample
    for row in rows:
        assert row["reference"]["gflop_per_sample"] > row["caspec"]["gflop_per_sample"]


def test_end_to_end_cold_and_warm(run):
    report = run[0]
    for name in ("e2e_cold", "e2e_warm"):
        r = report[name]
        assert r["phase1_steps"] == 3 and r["phase2_steps"] == 3 and r["batch"] == 4 and r["candidates"] == 8
        assert len(r["kept"]) == 4 and len(set(r["kept"])) == 4
        assert all(_positive(v) for v in r["parts"].values()), r["parts"]
        assert _positive(r["total_s"]) and r["total_s"] >= sum(r["parts"].values()) * 0.999
        assert _positive(r["phase1_step_ms"]) and _positive(r["phase2_step_ms"]) and _positive(r["projected_1000_1000_s"])
        assert len(r["losses"]) == 6 and all(math.isfinite(x) for x in r["losses"])
        assert {"embeddings.safetensors", "lora.safetensors", "card.yaml", "loss.jsonl"} <= set(r["asset_files"])
        assert r["asset_tokens"] == ["<dance1>", "<robot1>", "<robot2>", "<robot3>", "<robot4>"]
    # the projection: outside the loop as measured, plus 1000 steps of each phase at the run's own mean step time
    r = report["e2e_warm"]
    assert r["projected_1000_1000_s"] == pytest.approx(
        r["total_s"] - r["train_loop_s"] + r["phase1_step_ms"] + r["phase2_step_ms"], rel=1e-9)
    assert _positive(report["matmul"]["tflops"])


def test_markdown_shows_every_figure(run):
    report = run[0]
    md = G.markdown(report)
    m = report["meta"]
    for text in (m["date"], m["command"], m["card"], "tiny", "## 1. SDEdit", "## 2. Training steps",
                 "## 3. One concept end to end", "## 4. Hardware rate"):
        assert text in md, text
    figures = []
    sd = report["sdedit"]
    for side in ("caspec", "reference"):
        figures += [sd[side]["median_s"], sd[side]["warmup_s"], sd[side]["images_per_s"], *sd[side]["runs_s"]]
    assert G.fratio(sd["ratio_images_per_s"]) in md
    for row in report["train"]["rows"]:
        for side in ("caspec", "reference"):
            r = row[side]
            figures += [r[k] for k in ("samples_per_s", "step_ms", "gflop_per_sample", "effective_tflops",
                                       "fraction_of_matmul", "loss_first", "loss_last", "loss_mean")]
        assert G.fratio(row["ratio_samples_per_s"]) in md
    for name in ("e2e_cold", "e2e_warm"):
        r = report[name]
        figures += [r["total_s"], *r["parts"].values(), r["train_loop_s"], r["phase1_step_ms"], r["phase2_step_ms"],
                    r["projected_1000_1000_s"], r["initial_loss"], r["final_loss"]]
    figures += [report["matmul"]["tflops"], report["build"]["seconds"]]
    missing = [x for x in figures if G.fnum(x) not in md]
    assert not missing, missing


@pytest.fixture
def keep_rng():
    with torch.random.fork_rng(devices=[]):  # the references seed the global RNG
        yield


def test_reference_ti_trains_only_the_new_rows(keep_rng):
    models = G.Models(G.preset("tiny"), "cpu", "fp32")
    words, items = G.make_words(2), G.make_items(2, models.resolution)
    ref = G.ReferenceTI(models, words, items, batch=2)
    weight = ref.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == 49408 + 3 and weight.requires_grad
    before = weight.detach().clone()
    trainable = [p for m in (ref.text_encoder, ref.unet, ref.vae) for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is weight  # AdamW over the whole table, nothing else
    losses = [ref.step() for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    after = weight.detach()
    old = torch.ones(after.shape[0], dtype=torch.bool)
    old[torch.tensor(ref.placeholder_ids)] = False
    assert torch.equal(after[old], before[old]), "the restored rows must not move"
    assert all(not torch.equal(after[i], before[i]) for i in ref.placeholder_ids)
    # the models it was given are copies: the pristine text encoder has no new rows
    assert models.module("text_encoder").get_input_embeddings().weight.shape[0] == 49408


def test_reference_lora_trains_only_the_adapters(keep_rng):
    models = G.Models(G.preset("tiny"), "cpu", "fp32")
    ref = G.ReferenceLoRA(models, G.make_words(2), G.make_items(2, models.resolution), batch=1)
    names = {n for m in (ref.unet, ref.text_encoder) for n, p in m.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert any(".to_q.lora_A." in n for n in names) and any(".q_proj.lora_A." in n for n in names)
    base = {n: p.detach().clone() for n, p in ref.unet.named_parameters() if "lora_" not in n}
    lora_b = {n: p.detach().clone() for n, p in ref.unet.named_parameters() if "lora_B" in n}
    assert all(torch.count_nonzero(v) == 0 for v in lora_b.values())  # gaussian init: B = 0
    assert math.isfinite(ref.step()) and math.isfinite(ref.step())
    assert all(torch.equal(p, base[n]) for n, p in ref.unet.named_parameters() if n in base)
    assert any(torch.count_nonzero(p) > 0 for n, p in ref.unet.named_parameters() if "lora_B" in n)


def test_cli_writes_json_and_markdown(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("caspec_bench_gpu_cli", ROOT / "bench" / "gpu.py")
    cli = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, cli)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    rc = cli.main(["--size", "tiny", "--device", "cpu", "--out", str(out), "--quick", "--sections", "flops"])
    assert rc == 0
    report = json.loads((out / "gpu-bench.json").read_text())
    md = (out / "gpu-bench.md").read_text()
    assert report["meta"]["command"] == "python bench/gpu.py --size tiny --device cpu --out " + str(out) + \
        " --quick --sections flops"
    assert _positive(report["matmul"]["tflops"]) and "sdedit" not in report
    assert md == G.markdown(report) and md in capsys.readouterr().out
    assert G.fnum(report["matmul"]["tflops"]) in md


def test_settings_are_checked():
    with pytest.raises(ValueError, match="size"):
        G.settings_for("sdxl", "cpu")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        G.settings_for("tiny", "cpu", dtype="fp16")
    with pytest.raises(ValueError, match="train_warmup"):
        G.settings_for("tiny", "cpu", train_warmup=0)
    s = G.settings_for("sd15", "cuda")
    assert (s.dtype, s.ref_precision, s.e2e_phase1_steps, s.e2e_phase2_steps, s.sdedit_steps) == ("bf16", "fp16", 1000, 1000, 50)
    assert G.settings_for("sd15", "cuda", phase1_steps=100, phase2_steps=50).e2e_phase2_steps == 50
