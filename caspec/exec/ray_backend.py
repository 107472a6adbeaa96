"""The Ray executor: every step whose upstream is done runs at once, as a Ray task, on a cluster.

``caspec run SPEC --executor ray [--ray-address ADDR]`` (or ``CASPEC_EXECUTOR=ray``,
``CASPEC_RAY_ADDRESS``). Without an address, a local Ray instance is started for the run (a multi-GPU
workstation) and stopped after it; with one, the run joins that cluster (``ray start --head`` ...).

Each task runs :func:`caspec.exec.step.execute_job` in a worker process against the same store (a store
pickles as its address: ``caspec.store.common.reopen``), so keys and bytes are the local executor's.
Review gates run in the driver: they read and write the review folder beside the spec.

Resources per task, by step kind:

* a step that computes with torch (``Op.TORCH_COMPUTE``), when the model's device resolves to CUDA (an
  explicit ``device: cuda``, or ``auto`` on a cluster with GPUs): 1 GPU and 1 CPU;
* such a step on the CPU: ``threads`` CPUs (default 1), and its torch runs with exactly that many threads
  (the thread count is in its key: ``exec.compute``);
* any other step (export, review gates): a quarter of a CPU;
* ``resources={"train": {"cpus": 2, "gpus": 1}}`` (CLI ``--resources train=cpus:2,gpus:1``) overrides a kind.

A worker that dies (SIGKILL, a lost node) has its task retried by Ray (``max_retries``); a retried
training resumes from its checkpoint. Each worker resolves the model itself and refuses a step whose
model identity or device differs from what the driver keyed (``step.check_here``). Ctrl-C in the driver
cancels the running tasks; finished steps are already committed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ..errors import UsageError
from .compute import Compute, threads_setting
from .step import ERROR, JobResult, StepJob, execute_job

ADDRESS_ENV = "CASPEC_RAY_ADDRESS"
LIGHT_CPUS = 0.25


def parse_resources(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, float]]:
    """``("train=cpus:2,gpus:1", ...)`` -> ``{"train": {"cpus": 2.0, "gpus": 1.0}}``; UsageError if malformed."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        kind, sep, rest = item.partition("=")
        parts = dict(p.partition(":")[::2] for p in rest.split(",") if p)
        ok = sep and kind and parts and set(parts) <= {"cpus", "gpus"}
        try:
            values = {k: float(v) for k, v in parts.items()} if ok else {}
        except ValueError:
            values = {}
        if not values or any(v < 0 for v in values.values()):
            raise UsageError(f"--resources {item}: expected KIND=cpus:N[,gpus:M]",
                             hint="e.g. --resources train=cpus:2,gpus:1")
        out[kind.strip()] = values
    return out


_SPECS: dict[str, Any] = {}  # per worker process: the spec of a run, by its object id


def _task(job: StepJob, spec_box: list, store: Any) -> JobResult:
    """What a Ray worker runs for one step. The spec travels once per run through Ray's object store
    (``spec_box`` holds its ref, unresolved), not in every task: a spec of 1,000 steps pickles to 270 kB."""
    ref = spec_box[0]
    if ref.hex() not in _SPECS:
        import ray

        _SPECS.clear()
        _SPECS[ref.hex()] = ray.get(ref)
    job.loaded, job.check_identity = _SPECS[ref.hex()], True
    return execute_job(job, store)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, *, threads: int | None = None,
                 resources: dict[str, dict[str, float]] | None = None, max_retries: int = 3):
        self.address = address or os.environ.get(ADDRESS_ENV) or None
        self.threads = threads
        self.resources = resources or {}
        self.max_retries = max_retries
        self._ray: Any = None
        self._started_here = False
        self._remote: Any = None
        self._gpus = 0.0
        self._compute: Compute | None = None
        self._refs: dict[Any, StepJob] = {}
        self._inline: list[JobResult] = []
        self._spec_refs: dict[int, Any] = {}  # id(loaded) -> its ref in Ray's object store

    # -- the cluster ---------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        if self.address is None:  # a local instance binds and advertises 127.0.0.1 only (read at import)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray: Ray is not installed",
                             hint="pip install 'caspec[ray]' (or: pip install ray)") from None
        if not ray.is_initialized():
            try:  # workers take their environment (caches, credentials) from their own machine
                ray.init(address=self.address, include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False)
            except ConnectionError as exc:
                raise UsageError(f"--ray-address {self.address}: cannot reach a Ray cluster ({exc})",
                                 hint="start one with `ray start --head`, or leave the address out "
                                      "to start a local one") from None
            self._started_here = True
        self._ray = ray
        self._gpus = float(ray.cluster_resources().get("GPU", 0))
        self._remote = ray.remote(_task)
        return ray

    def compute(self, loaded: Any) -> Compute:
        """Keys promise CUDA where the model's device is `cuda`, or `auto` on a cluster with GPUs;
        else the CPU, with each kind's CPU allotment as its thread count."""
        if self._compute is None:
            self._connect()
            device = loaded.spec.model.device
            if device == "auto":
                device = "cuda" if self._gpus > 0 else "cpu"
            default = threads_setting(self.threads) or 1
            per_kind = {kind: max(1, math.ceil(r["cpus"])) for kind, r in self.resources.items() if "cpus" in r}
            self._compute = Compute(device=device, default_threads=default, threads=per_kind)
        return self._compute

    def options(self, job: StepJob) -> dict[str, Any]:
        """The Ray resources of ``job``'s task (module docstring)."""
        node = job.node
        compute = job.compute or {}
        if compute.get("device") == "cuda":
            cpus, gpus = 1.0, 1.0
        elif compute:
            cpus, gpus = float(compute["threads"]), 0.0
        else:
            cpus, gpus = LIGHT_CPUS, 0.0
        override = self.resources.get(node.kind, {})
        cpus, gpus = override.get("cpus", cpus), override.get("gpus", gpus)
        return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": self.max_retries,
                "name": f"caspec:{node.id}"}

    # -- the executor interface ----------------------------------------------------------------
    def start(self, store: Any) -> None:
        self._connect()

    def submit(self, job: StepJob, store: Any, reporter: Any) -> None:
        if job.node.op.IS_GATE:  # review gates read and write the review folder beside the spec
            self._inline.append(execute_job(job, store, progress=reporter.progress, notify=reporter.warn))
            return
        loaded = job.loaded
        if id(loaded) not in self._spec_refs:
            self._spec_refs[id(loaded)] = self._ray.put(loaded)
        task_job = dataclasses.replace(job, loaded=None)
        ref = self._remote.options(**self.options(job)).remote(task_job, [self._spec_refs[id(loaded)]], store)
        self._refs[ref] = job

    def poll(self) -> list[JobResult]:
        """Results of the steps run in the driver (gates); tasks' results come from :meth:`wait`, so that
        submitting n steps costs O(n), not a scan of every running task per submission."""
        done, self._inline = self._inline, []
        return done

    def wait(self) -> list[JobResult]:
        done = self.poll()
        if self._refs:
            refs = list(self._refs)
            if not done:
                self._ray.wait(refs, num_returns=1)
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
            done += [self._take(ref) for ref in ready]
        return done

    def _take(self, ref: Any) -> JobResult:
        job = self._refs.pop(ref)
        try:
            return self._ray.get(ref)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the worker died past its retries, or the task could not run
            cause = getattr(exc, "cause", None) or exc
            text = str(cause).strip().splitlines()
            return JobResult(job.node.id, job.node.key, ERROR, message=f"Ray task failed: "
                             f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": "),
                             hint="the step's worker died or was cancelled; re-run to retry it")

    def stop(self) -> None:
        if self._ray is None:
            return
        for ref in list(self._refs):  # still running: Ctrl-C or an error in the driver
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # already finished, or the cluster is gone
                pass
        self._refs.clear()
        self._spec_refs.clear()
        if self._started_here:
            self._ray.shutdown()
            self._ray, self._started_here = None, False


__all__ = ["RayExecutor", "parse_resources", "ADDRESS_ENV"]
