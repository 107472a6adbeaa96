"""Crash injection for the crash tests: ``CASPEC_CRASH_AFTER_WRITES=N`` ends the process abruptly
(``os._exit``, no clean-up, like kill -9) right after its N-th durable store write, as SQLite's crash tests do.

The stores call :func:`wrote` after each write that another process could see: an object moved or uploaded
into the store, an action record, a spec's state, the VERSION file, a lease. Unset (always, outside tests),
it costs one environment lookup.
"""
from __future__ import annotations

import os

ENV = "CASPEC_CRASH_AFTER_WRITES"
EXIT_CODE = 86
_writes = 0


def wrote(what: str) -> None:
    """Count one durable store write (``what`` names it); crash here if this is the write ``ENV`` names."""
    global _writes
    limit = os.environ.get(ENV)
    if not limit:
        return
    _writes += 1
    if _writes >= int(limit):
        os.write(2, f"caspec: crash injected after store write {_writes} ({what})\n".encode())
        os._exit(EXIT_CODE)


__all__ = ["ENV", "EXIT_CODE", "wrote"]
