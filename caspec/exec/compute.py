"""What a step computes on (device and CPU threads): part of its cache key, and set before its op runs.

On a CPU, torch's results depend on the intra-op thread count (a sum split over 1 or 2 threads rounds
differently: measured, SDEdit's images differ between 1 and 2 threads). So for a step that does torch
computation (``Op.TORCH_COMPUTE``) the key holds ``compute = {"device": "cpu", "threads": N}``, and the
executor runs the op with exactly ``N`` threads: a key promises the bytes of that device and thread
count, whichever executor or machine made them. On CUDA the key holds ``{"device": "cuda"}`` (the CPU
thread count does not decide what a GPU computes). Steps that do no torch computation carry no
``compute``.

``N`` is the run's setting: ``--threads`` / ``CASPEC_THREADS``; else, for the local executor, the count
torch would choose here (``environment.predicted_torch_threads``); for the Ray executor, 1 per CPU task
(its CPU allotment: the task asks Ray for ``N`` CPUs, so tasks never oversubscribe a machine).

Concurrent CPU steps on one machine take its cores in turn (``exec.cpu_slots``), so that their OpenMP
threads never oversubscribe it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

THREADS_ENV = "CASPEC_THREADS"


def threads_setting(value: int | None = None) -> int | None:
    """The thread count asked for: ``value``, else ``$CASPEC_THREADS``; None when neither is set.
    A bad ``$CASPEC_THREADS`` is a UsageError."""
    if value is not None:
        return value
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        from ..errors import UsageError

        raise UsageError(f"{THREADS_ENV}={raw!r}: not a positive whole number", hint=f"e.g. {THREADS_ENV}=2")
    return int(raw)


@dataclass(frozen=True)
class Compute:
    """How an executor runs the steps of one plan: the device of model steps and the CPU threads of each
    step kind (``threads[kind]``, else ``default_threads``)."""

    device: str
    default_threads: int
    threads: dict[str, int] = field(default_factory=dict)

    def for_node(self, node: Any) -> dict[str, Any] | None:
        """The ``compute`` part of ``node``'s key (None: the step does no torch computation)."""
        if not getattr(node.op, "TORCH_COMPUTE", False):
            return None
        if self.device != "cpu":
            return {"device": self.device}
        return {"device": "cpu", "threads": self.threads_for(node.kind)}

    def threads_for(self, kind: str) -> int:
        return self.threads.get(kind, self.default_threads)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "default_threads": self.default_threads, "threads": dict(self.threads)}

    @classmethod
    def from_json(cls, data: Any) -> "Compute | None":
        """The compute a run's state recorded (None if absent or malformed)."""
        try:
            return cls(str(data["device"]), int(data["default_threads"]),
                       {str(k): int(v) for k, v in (data.get("threads") or {}).items()})
        except (TypeError, KeyError, ValueError, AttributeError):
            return None


def recorded_compute(store: Any, loaded: Any) -> Compute | None:
    """The compute of the spec's last run on ``store`` (its state), e.g. a Ray run's 1 thread per task:
    ``gc`` and ``assets`` also look there, so that what another executor built is found and kept."""
    return Compute.from_json(store.read_state(loaded.name).get("compute"))


def local_compute(loaded: Any, threads: int | None = None) -> Compute:
    """The local executor's compute: the spec model's device here, ``threads`` (or the environment's)."""
    from ..environment import predicted_torch_threads
    from ..models.load import resolve_device

    n = threads_setting(threads) or predicted_torch_threads()
    return Compute(device=resolve_device(loaded.spec.model), default_threads=n)


def apply(compute: dict[str, Any] | None) -> None:
    """Set torch's intra-op threads to what the step's key says (before its op runs)."""
    if not compute or "threads" not in compute:
        return
    import torch

    if torch.get_num_threads() != compute["threads"]:
        torch.set_num_threads(int(compute["threads"]))


__all__ = ["THREADS_ENV", "Compute", "threads_setting", "local_compute", "recorded_compute", "apply"]
