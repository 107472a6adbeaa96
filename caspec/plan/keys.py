"""The cache key recipe: sha256 of canonical JSON over everything that decides a step's output.

Key material = {key_version, kind, op_version, params, model, compute, inputs, upstream}:
resolved parameters, the model's identity (file hashes / pinned commit / tiny's build recipe), what a
torch step computes on (device, and on a CPU the thread count: ``caspec.exec.compute``),
digests of the user files a step reads, and, per upstream role, the *content digest* of the upstream
record the step consumes (:func:`content_digest`: its output files and its result), not the upstream's
key. So a step stays cached while its upstream's bytes stay the same, even when the upstream re-ran
(``--force``, or another key that made the same bytes), and re-runs when they change: early cutoff, as
in Bazel, Buck2 and Shake. Step ids never enter a key, so renaming a step keeps its cache.

While an upstream step has yet to run, its content is unknown and a downstream key is *provisional*
(:func:`pending_content`); the executor re-keys each step from the records it actually uses.
"""
from __future__ import annotations

from typing import Any

from ..store.hashing import sha256_json

KEY_VERSION = 3  # 2: upstream enters as the content digest of its record (was: its key); 3: `compute`
PENDING = "pending:"


def content_digest(record: Any) -> str:
    """What a downstream step consumes of ``record``: each output file's digest (relpath -> sha256) and the
    op's result. Nothing volatile enters (timings and the environment live in ``meta``), so a re-run that
    writes the same bytes and returns the same result gives the same digest. Ops must therefore keep
    timings out of their result and files."""
    files = {rel: entry["digest"] for rel, entry in record.outputs.items()}
    return sha256_json({"files": files, "result": record.result})


def pending_content(upstream_key: str) -> str:
    """Stand-in for the content of an upstream step that has not run yet: keeps provisional keys
    deterministic (and different when the upstream's key differs); never equals a content digest."""
    return PENDING + upstream_key


def is_pending(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PENDING)


def key_material(*, kind: str, op_version: int, params: dict[str, Any], model: dict[str, Any] | None,
                 inputs: dict[str, str], upstream: dict[str, str],
                 compute: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "key_version": KEY_VERSION,
        "kind": kind,
        "op_version": op_version,
        "params": params,
        "model": model,
        "compute": compute,
        "inputs": inputs,
        "upstream": upstream,
    }


def cache_key(material: dict[str, Any]) -> str:
    return sha256_json(material)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        text = value[:10]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def diff_material(old: dict[str, Any], new: dict[str, Any], upstream_ids: dict[str, str]) -> list[str]:
    """Human reasons why ``new`` differs from ``old``: ``params.strength 0.8 -> 0.86``, ``upstream `robot` changed``."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    reasons: list[str] = []
    model_changed = False
    for path in sorted(set(a) | set(b)):
        if a.get(path, _MISSING) == b.get(path, _MISSING):
            continue
        head = path.split(".", 1)[0]
        if head == "upstream":
            role = path.split(".", 1)[1] if "." in path else path
            reasons.append(f"upstream `{upstream_ids.get(role, role)}` changed")
        elif head == "model":
            model_changed = True
        elif head == "inputs":
            reasons.append(f"input `{path.split('.', 1)[1]}` changed")
        elif head in ("key_version", "op_version", "kind"):
            reasons.append(f"{path} {_short(a.get(path))} -> {_short(b.get(path))} (caspec changed)")
        elif path not in a:
            reasons.append(f"{path} added: {_short(b[path])}")
        elif path not in b:
            reasons.append(f"{path} removed (was {_short(a[path])})")
        else:
            reasons.append(f"{path} {_short(a[path])} -> {_short(b[path])}")
    if model_changed:
        reasons.append("model identity changed")
    return reasons


_MISSING = object()
