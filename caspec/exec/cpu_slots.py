"""Machine-wide CPU slots, so that concurrent caspec steps on one machine never oversubscribe its cores.

torch's OpenMP threads spin-wait at every barrier. Measured on a 2-core machine with ``make demo``'s
spec: one run alone took 42 s; two runs at once with 2 threads each took 378 s (9x), because each
process's threads wait on the other's. Sleeping instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) cures
that but doubled a lone run's time (measured: 51 s -> 101 s), and fewer threads would change the bytes
(``exec.compute``). So a step that computes on the CPU with ``N`` threads first takes ``N`` of the
machine's slots (one per core), each an OS file lock under ``<caspec cache>/cpu-slots/`` held for the
whole op; a step that finds too few free waits until another finishes. Two busy runs then share the
machine in turn, and each step runs at full speed: the pair takes about twice one run.

Locks are ``filelock`` (``flock``): a process killed with SIGKILL frees its slots at once. Slots are
taken all-or-nothing (try each, give back all on a shortfall, sleep, retry), so no two steps can
deadlock holding part of what they need. ``CASPEC_CPU_SLOTS=0`` turns this off; a number sets the
machine's slot count (default: its physical cores).
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator

SLOTS_ENV = "CASPEC_CPU_SLOTS"


def slot_count() -> int:
    """How many slots this machine has (0: slots are off)."""
    raw = os.environ.get(SLOTS_ENV, "").strip()
    if raw.isdigit():
        return int(raw)
    from ..environment import physical_cores

    return physical_cores()


def slot_dir() -> Path:
    from ..models.tiny import cache_root

    return cache_root() / "cpu-slots"


@contextlib.contextmanager
def cpu_slots(threads: int, *, on_wait: Callable[[str], None] | None = None,
              poll: float = 0.2) -> Iterator[int]:
    """Hold ``threads`` CPU slots (at most the machine's count) for the ``with`` body; yields how many."""
    total = slot_count()
    need = min(max(1, threads), total)
    if total <= 0:
        yield 0
        return
    from filelock import FileLock, Timeout

    folder = slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(folder / f"slot-{i}.lock"), thread_local=False) for i in range(total)]
    held: list = []
    said = False
    while True:
        for lock in locks:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            held.append(lock)
            if len(held) == need:
                break
        if len(held) == need:
            break
        for lock in held:
            lock.release()
        held.clear()
        if on_wait is not None and not said:
            on_wait(f"waiting for {need} free CPU core(s): other caspec steps are computing on this machine")
            said = True
        time.sleep(poll * (0.5 + random.random()))
    try:
        yield need
    finally:
        for lock in held:
            lock.release()


__all__ = ["SLOTS_ENV", "slot_count", "slot_dir", "cpu_slots"]
