"""The local executor: runs each step in this process, one at a time, as soon as it is submitted."""
from __future__ import annotations

from typing import Any

from .compute import Compute, local_compute
from .step import JobResult, StepJob, execute_job


class LocalExecutor:
    """Steps run inline in :meth:`submit`; ``threads`` (default: ``$CASPEC_THREADS``, else torch's own
    choice here) is the CPU thread count their keys promise."""

    name = "local"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._done: list[JobResult] = []

    def compute(self, loaded: Any) -> Compute:
        return local_compute(loaded, self.threads)

    def start(self, store: Any) -> None: ...

    def submit(self, job: StepJob, store: Any, reporter: Any) -> None:
        self._done.append(execute_job(job, store, progress=reporter.progress, notify=reporter.warn))

    def poll(self) -> list[JobResult]:
        done, self._done = self._done, []
        return done

    def wait(self) -> list[JobResult]:
        return self.poll()

    def stop(self) -> None: ...
