"""What made a step's outputs: library versions, device and torch thread count.

The executor writes :func:`environment` into every action record's metadata; ``caspec plan`` compares a
cached record's environment with the current one (:func:`differences`) and says where they differ.
That is information, never a reason to re-run: keys do not contain library versions, so a store shared
between machines serves the first result computed for a key (see the README's "Reproducibility"); what a
torch step computes on (device, CPU threads) is in its key (``caspec.exec.compute``).

Nothing here imports torch (planning must not): the thread count is asked of torch only when torch is
already imported, and otherwise predicted the way torch chooses it.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

#: name in records -> distribution name
LIBRARIES = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
             "open_clip": "open_clip_torch", "pillow": "pillow", "safetensors": "safetensors", "caspec": "caspec"}


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Installed version of each library in :data:`LIBRARIES` (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for name, dist in LIBRARIES.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _env_threads(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@functools.cache
def physical_cores() -> int:
    """Physical CPU cores (Linux: distinct sibling sets in sysfs), else the logical CPU count. Read once per
    process: every plan and every CPU step asks."""
    siblings = set()
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/core_cpus_list"):
        try:
            siblings.add(path.read_text().strip())
        except OSError:
            continue
    return len(siblings) or os.cpu_count() or 1


def predicted_torch_threads() -> int:
    """The intra-op thread count torch will choose in this process: ``MKL_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else the physical cores (torch's ``intraop_default_num_threads``)."""
    return _env_threads("MKL_NUM_THREADS") or _env_threads("OMP_NUM_THREADS") or physical_cores()


def torch_threads() -> int:
    """torch's intra-op thread count: asked of torch if it is imported, else predicted (no import)."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    return predicted_torch_threads()


def environment(device: str | None) -> dict[str, Any]:
    """The environment block of an action record: ``libraries``, ``device`` (None: the step did no torch
    computation), ``torch_threads``."""
    return {"libraries": dict(library_versions()), "device": device, "torch_threads": torch_threads()}


def differences(made: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Where a record's environment ``made`` differs from ``now``: name -> (made, now).

    Libraries are compared when both sides name a version; the device when both name one; the thread
    count only for steps computed on the CPU (on a GPU it does not decide the bytes)."""
    out: dict[str, tuple[Any, Any]] = {}
    old_libs, new_libs = made.get("libraries") or {}, now.get("libraries") or {}
    for name in LIBRARIES:
        a, b = old_libs.get(name), new_libs.get(name)
        if a is not None and b is not None and a != b:
            out[name] = (a, b)
    a, b = made.get("device"), now.get("device")
    if a is not None and b is not None and a != b:
        out["device"] = (a, b)
    a, b = made.get("torch_threads"), now.get("torch_threads")
    if made.get("device") == "cpu" and a is not None and b is not None and a != b:
        out["torch_threads"] = (a, b)
    return out


def describe(diff: dict[str, tuple[Any, Any]]) -> str:
    """``made with torch 2.13.0 (now 2.14.1), 1 thread (now 2)``; "" for no differences."""
    parts = []
    for name, (a, b) in diff.items():
        if name == "torch_threads":
            parts.append(f"{a} thread{'s' if a != 1 else ''} (now {b})")
        elif name == "device":
            parts.append(f"device {a} (now {b})")
        else:
            parts.append(f"{name} {a} (now {b})")
    return "made with " + ", ".join(parts) if parts else ""


__all__ = ["LIBRARIES", "library_versions", "physical_cores", "predicted_torch_threads", "torch_threads",
           "environment", "differences", "describe"]
