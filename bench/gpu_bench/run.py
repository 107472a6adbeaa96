"""The GPU benchmark's whole run: import the libraries (timed, part of a cold start), build the models, run the
asked-for sections in their order (end to end cold, matmul rate, SDEdit, training, end to end warm), record
a failed section and go on, and hand the growing report to ``on_section`` after every step."""
from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .e2e import bench_e2e
from .measure import free_memory
from .models import Models, preset
from .report import derive, error_record, meta
from .sections import bench_matmul, bench_sdedit, bench_train
from .settings import BenchSettings


def run_benchmark(s: BenchSettings, *, command: str | None = None,
                  on_section: Callable[[dict[str, Any]], None] | None = None,
                  log: Callable[[str], None] = lambda _m: None, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the sections of ``s`` and return the report (see the package docstring for what is measured).

    A section that fails is recorded as ``{"error": ..., "traceback": ...}`` and the run goes on.
    ``on_section(report)`` is called after the models are built and after every section."""
    import torch

    s.validate()
    if s.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    report: dict[str, Any] = {"meta": meta(s, command)}
    devices = [0] if s.device == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the references seed the global RNG: leave the caller's alone
        _run_sections(s, report, on_section or (lambda _r: None), log, work_dir)
    return report


def _run_sections(s: BenchSettings, report: dict[str, Any], notify: Callable[[dict[str, Any]], None],
                  log: Callable[[str], None], work_dir: str | Path | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="caspec-gpu-bench-", dir=work_dir))
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        for name in ("diffusers", "transformers", "peft", "caspec.train.trainer"):  # part of a cold start
            importlib.import_module(name)
        report["meta"]["import_s"] = time.perf_counter() - t0
        log(f"building the {s.size} models on {s.device} ...")
        try:
            models = Models(preset(s.size), s.device, s.dtype, s.seed)
        except Exception as exc:  # noqa: BLE001 - recorded, and nothing else can run
            report["build"] = error_record(exc)
            log(f"building the models FAILED: {report['build']['error']}")
            notify(report)
            return
        report["build"] = {"seconds": models.build_s, "parameters": models.params, "resolution": models.resolution}
        log(f"built in {models.build_s:.1f} s: {models.params}")
        notify(report)

        def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
            log(f"section {name} ...")
            t = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as exc:  # noqa: BLE001
                report[name] = error_record(exc)
                log(f"section {name} FAILED: {report[name]['error']}")
                free_memory(models.device)
            if isinstance(report[name], dict):
                report[name]["section_s"] = time.perf_counter() - t
            log(f"section {name} done in {time.perf_counter() - t:.1f} s")
            derive(report)
            notify(report)

        if "e2e" in s.sections:
            section("e2e_cold", lambda: bench_e2e(models, s, work, "cold"))
        if "flops" in s.sections:
            section("matmul", lambda: bench_matmul(models.device, s.matmul_n, s.matmul_iters))
        if "sdedit" in s.sections:
            section("sdedit", lambda: bench_sdedit(models, s))
        if "train" in s.sections:
            section("train", lambda: bench_train(models, s, work, log))
        if "e2e" in s.sections:
            section("e2e_warm", lambda: bench_e2e(models, s, work, "warm"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["meta"]["total_s"] = time.perf_counter() - t_all
    try:
        import resource

        report["meta"]["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001 - not on every platform
        report["meta"]["max_rss_bytes"] = None
    derive(report)
    notify(report)
