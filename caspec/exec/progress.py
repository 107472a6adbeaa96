"""Progress and log lines for a run, on stderr: a rich progress bar per step and per image.

The executor talks to a ``Reporter``; ``RichReporter`` draws bars on a terminal and plain lines
elsewhere (CI logs: never wrapped, so a step's line keeps its duration), ``NullReporter`` stays
silent (API use, tests).
"""
from __future__ import annotations

import sys
from typing import Any


class NullReporter:
    def start(self, total_steps: int) -> None: ...
    def step_started(self, node: Any) -> None: ...
    def progress(self, done: int, total: int, desc: str = "") -> None: ...
    def step_finished(self, node: Any, outcome: str, detail: str = "") -> None: ...
    def warn(self, message: str) -> None: ...
    def stop(self) -> None: ...


_MARK = {"ran": "[green]✓[/]", "cached": "[dim]·[/]", "awaiting-review": "[yellow]⏸[/]",
         "blocked": "[dim]-[/]", "failed": "[red]✗[/]", "would-run": "[cyan]→[/]",
         "differs-from-lock": "[red]≠[/]"}


class RichReporter(NullReporter):
    """Bars on a terminal, one line per finished step always (stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal
        if not self.live:  # CI logs: one line per step, however long; rich would wrap at 80 columns
            self.console.soft_wrap = True
        self.progress_bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True,
                                     disable=not self.live)
        self._steps = self._images = None

    def start(self, total_steps: int) -> None:
        self.progress_bar.start()
        self._steps = self.progress_bar.add_task("steps", total=total_steps)

    def step_started(self, node: Any) -> None:
        if self._images is not None:
            self.progress_bar.remove_task(self._images)
        self._images = self.progress_bar.add_task(f"  {node.id} ({node.kind})", total=None)

    def progress(self, done: int, total: int, desc: str = "") -> None:
        if self._images is not None:
            extra = {"description": f"  {desc}"} if desc else {}
            self.progress_bar.update(self._images, completed=done, total=total, **extra)

    def step_finished(self, node: Any, outcome: str, detail: str = "") -> None:
        if self._steps is not None:
            self.progress_bar.advance(self._steps)
        mark = _MARK.get(outcome, "?")
        tail = f"  [dim]{detail}[/]" if detail else ""
        self.console.print(f"{mark} {node.id:<20} {node.kind:<7} {outcome:<16} {node.short_key}{tail}")

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}")

    def stop(self) -> None:
        if self._images is not None:
            self.progress_bar.remove_task(self._images)
            self._images = None
        self.progress_bar.stop()


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
