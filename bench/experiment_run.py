"""What the shapes-world experiment drivers in bench/ share: run a spec timed, then report its tables and
measures (stdout: the tables and one JSON line of run facts; ``--json``: those facts and the measures)."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from caspec.exec.progress import RichReporter
from caspec.exec.runner import run


def run_timed(loaded: Any, store: Any) -> float | None:
    """Run ``loaded`` against ``store``; its seconds, or None (said on stderr) when the run failed."""
    t0 = time.perf_counter()
    summary = run(loaded, store, reporter=RichReporter())
    seconds = time.perf_counter() - t0
    if summary.exit_code != 0:
        print(f"caspec run failed with exit code {summary.exit_code}", file=sys.stderr)
        return None
    return seconds


def report(tables: str, result: dict[str, Any], seconds: float, json_path: str | None) -> dict[str, Any]:
    """Print ``tables`` and the run facts; write them with ``result`` to ``json_path`` if given."""
    meta = {"run_seconds": round(seconds, 1), "machine": platform.machine(), "python": platform.python_version()}
    print(tables)
    print(json.dumps(meta))
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta, "result": result}, indent=1, sort_keys=True) + "\n")
    return meta
