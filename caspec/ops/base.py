"""The contract every step kind implements, and the context an op runs in.

An op is a small object with ``KIND``, ``VERSION`` and four methods:

* ``params(step, spec)``: the resolved parameters that enter the cache key (JSON-able, no paths);
* ``inputs(step, spec_dir)``: user files the step reads (their digests enter the key);
* ``upstream(step)``: role -> upstream step id (their keys enter the key; ids themselves never do);
  ``shown_upstream(step, spec)`` adds steps whose outputs the op only shows beside its own (compose's roots):
  upstream all the same, in the key and in ``ctx.upstream``;
* ``run(ctx)``: do the work, writing files only under ``ctx.out_dir``; return the step's result
  (JSON-able), typically ``{"images": [ImageEntry, ...]}``. Files and result are the step's *content*:
  downstream keys follow them (early cutoff), so they hold nothing volatile. Timings and other facts about
  the run go in ``ctx.meta`` (the action record's metadata).

Bump ``VERSION`` whenever the op's output for the same key material would change.
Planning calls the first three only; ``run`` is called by the executor alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from ..spec.models import ModelSpec, Spec


class UpstreamOutput(Protocol):
    """What an op sees of a finished upstream step: its result and its files (read-only)."""

    key: str
    result: dict[str, Any]

    def file(self, relpath: str) -> Path: ...

    def digest(self, relpath: str) -> str: ...


@dataclass
class RunContext:
    """Everything ``Op.run`` may use. It must write only under ``out_dir``."""

    step_id: str
    spec_name: str
    key: str
    params: dict[str, Any]
    out_dir: Path
    spec_dir: Path
    model: ModelSpec
    upstream: dict[str, UpstreamOutput] = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    # progress(done, total, description) -> None; called from the op as images finish
    progress: Callable[[int, int, str], None] = lambda done, total, desc="": None
    # extra per-step state the executor passes (e.g. the review manifest path)
    extra: dict[str, Any] = field(default_factory=dict)
    # facts about this run, not about its outputs (time taken, the checkpoint it resumed from): the executor
    # writes them into the action record's ``meta["run"]``. They never enter the step's files or result, so
    # downstream keys (which follow the content of the files and result) never see them
    meta: dict[str, Any] = field(default_factory=dict)


class Op:
    """Base class for step kinds; see the module docstring for the contract."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    USES_MODEL: ClassVar[bool] = True
    IS_GATE: ClassVar[bool] = False  # a review gate: implements ``gate``
    # does torch computation whose bytes depend on the device and CPU thread count (``exec.compute``)
    TORCH_COMPUTE: ClassVar[bool] = True
    # ``params`` takes ``family=`` (the step's model family, :mod:`caspec.families`): defaults that differ by family
    USES_FAMILY: ClassVar[bool] = False

    def params(self, step: Any, spec: Spec) -> dict[str, Any]:
        raise NotImplementedError

    def model_of(self, step: Any) -> ModelSpec | None:
        """The model this step names for itself (None: the spec's)."""
        return None

    def plan_facts(self, step_id: str, step: Any, params: dict[str, Any], family: Any, loaded: Any) -> dict[str, Any]:
        """Facts planning shows about a step (pure; e.g. an edit's start step and σ); a problem it finds is a spec
        error at its line. Called for ops with ``USES_FAMILY``."""
        return {}

    def inputs(self, step: Any, spec_dir: Path) -> dict[str, Path]:
        return {}

    def upstream(self, step: Any) -> dict[str, str]:
        return {}

    def shown_upstream(self, step: Any, spec: Spec) -> dict[str, str]:
        """Role -> step id of steps whose outputs this op shows beside its own (e.g. the root an asset came
        from): upstream like the others, so their content enters the key."""
        return {}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def gate(self, step: Any, step_id: str, loaded: Any, upstream: dict[str, Any] | None = None) -> "GateState | None":
        """For review gates: the person's decision as read from disk (read-only), given the upstream outputs
        when they exist (role -> UpstreamOutput). None for ordinary ops."""
        return None


@dataclass
class GateState:
    """A review gate's decision as the planner sees it. ``material`` enters the key (e.g. kept digests)."""

    manifest: Path
    decided: bool
    material: dict[str, Any]
    reason: str = ""
    source_key: str | None = None
    provisional: bool = False  # the decision could not be resolved to digests yet (upstream not run)


class UpstreamView:
    """What an op sees of a finished upstream step (see UpstreamOutput): images carry ``digest``
    (the op's pixel digest, else the file's) and ``file_digest``."""

    def __init__(self, record: Any):
        self.record = record
        self.key = record.key
        self.result = _with_digests(record.result, record.outputs)

    def file(self, relpath: str) -> Path:
        return self.record.file(relpath)

    def digest(self, relpath: str) -> str:
        return self.record.digest(relpath)


def _with_digests(result: dict[str, Any], outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if "images" not in result:
        return result
    images = [{**img, "digest": img.get("digest") or outputs[img["file"]]["digest"],
               "file_digest": outputs[img["file"]]["digest"]} for img in result["images"]]
    return {**result, "images": images}


def image_entry(id: str, file: str, **meta: Any) -> dict[str, Any]:
    """One image in a step result: a stable ``id``, its ``file`` under the step output, and metadata
    (prompt, negative_prompt, seed, source id, ...). The executor adds ``digest`` from the store."""
    return {"id": id, "file": file, **meta}
