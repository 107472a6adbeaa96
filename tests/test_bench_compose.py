"""The compose benchmark runs (at a tiny size) so it cannot rot; its numbers live in BENCHMARKS.md."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_compose_benchmark_runs():
    path = Path(__file__).resolve().parent.parent / "bench" / "compose_throughput.py"
    spec = importlib.util.spec_from_file_location("compose_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run_benchmark(prompts=2, steps=2, repeats=1)
    assert r["median_single"] > 0 and r["median_reload"] > 0 and r["ratio"] > 0
