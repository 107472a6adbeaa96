"""The small tree of errors caspec raises, each knowing how to render itself for a person.

Every error a user can cause derives from :class:`CaspecError` and carries an exit code:
2 for bad specs or usage, 1 for a failed step, 3 for a run stopped at a review gate, 4 for a run or lock
that differs from the spec's lockfile (``caspec.lock``).
The CLI prints ``str(err)`` (already formatted, with ``hint:`` lines) and exits with ``err.exit_code``.
"""
from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_STEP_FAILED = 1
EXIT_BAD_SPEC = 2
EXIT_REVIEW = 3
EXIT_FROZEN = 4
EXIT_INTERRUPTED = 130


class CaspecError(Exception):
    """Base class: a message for a person, an optional hint, an exit code."""

    exit_code = EXIT_BAD_SPEC

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.render()


@dataclass
class Problem:
    """One problem at one place in a spec file (1-based line and column)."""

    file: str
    line: int | None
    col: int | None
    path: str
    message: str
    hint: str | None = None
    source_line: str | None = None

    def render(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        head = f"{where}: error: "
        head += f"{self.path}: {self.message}" if self.path else self.message
        out = [head]
        if self.source_line is not None and self.line is not None:
            gutter = f"{self.line:>4} | "
            out.append(gutter + self.source_line.rstrip("\n"))
            out.append(" " * (len(gutter) + max((self.col or 1) - 1, 0)) + "^")
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


class SpecError(CaspecError):
    """One or more problems in a spec file, each with file, line, column and dotted path."""

    exit_code = EXIT_BAD_SPEC

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        first = problems[0]
        super().__init__(first.message, first.hint)

    def render(self) -> str:
        return "\n\n".join(p.render() for p in self.problems)


class UsageError(CaspecError):
    """Bad command-line usage or a file that cannot be read."""

    exit_code = EXIT_BAD_SPEC


class ModelError(CaspecError):
    """A model that cannot be found or loaded (no weights offline, bad folder)."""

    exit_code = EXIT_BAD_SPEC


class PlanError(CaspecError):
    """The spec is valid but cannot be compiled into a DAG (cycle, bad reference)."""

    exit_code = EXIT_BAD_SPEC


class StepFailed(CaspecError):
    """A step raised while running; the store holds nothing for it."""

    exit_code = EXIT_STEP_FAILED

    def __init__(self, step_id: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.step_id = step_id

    def render(self) -> str:
        return CaspecError(f"step `{self.step_id}` failed: {self.message}", self.hint).render()


class ReviewPending(CaspecError):
    """A review gate needs a person's decision before the branch can go on."""

    exit_code = EXIT_REVIEW

    def __init__(self, step_id: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.step_id = step_id


class ReviewError(CaspecError):
    """A review manifest that is inconsistent with the candidates (stale or malformed)."""

    exit_code = EXIT_STEP_FAILED

    def __init__(self, step_id: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.step_id = step_id


class StoreError(CaspecError):
    """The store is unusable (unwritable, locked beyond patience)."""

    exit_code = EXIT_STEP_FAILED


class RecipeError(CaspecError):
    """A recipe that cannot be packed, or an archive that is unsafe or damaged to unpack."""

    exit_code = EXIT_BAD_SPEC


class LockError(CaspecError):
    """A lockfile that is missing, unreadable or not one caspec wrote."""

    exit_code = EXIT_BAD_SPEC


class LockMismatch(CaspecError):
    """The spec, its inputs, the model or the environment differ from the lock (``--frozen``, ``--check``)."""

    exit_code = EXIT_FROZEN

    def __init__(self, path: object, differences: list[str], hint: str | None = None):
        self.path, self.differences = path, differences
        lines = "\n".join(f"  - {d}" for d in differences)
        super().__init__(f"{path}: {len(differences)} difference(s) from the lock:\n{lines}",
                         hint or f"if the changes are intended, update the lock with `caspec lock "
                                 f"{str(path)[:-5] if str(path).endswith('.lock') else 'SPEC'}`")


__all__ = [
    "EXIT_OK", "EXIT_STEP_FAILED", "EXIT_BAD_SPEC", "EXIT_REVIEW", "EXIT_FROZEN", "EXIT_INTERRUPTED",
    "CaspecError", "Problem", "SpecError", "UsageError", "ModelError", "PlanError",
    "StepFailed", "ReviewPending", "ReviewError", "StoreError", "LockError", "LockMismatch", "RecipeError",
]
