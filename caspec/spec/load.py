"""Load a spec file into a validated :class:`~caspec.spec.models.Spec`, keeping file positions.

Loading runs in phases; each collects every problem it finds, and a phase that found any
stops the load (later phases would only report follow-on noise):

1. read and parse: the file (at most 1 MiB) is composed into YAML nodes, then walked into
   plain data while recording the (line, col) of every value and key, refusing duplicate
   keys, non-string keys, unknown tags and documents that expand past a node or depth limit
   (alias bombs). ``<<`` merge keys and anchors/aliases work as in YAML 1.1. Timestamps stay
   strings (no field takes a date).
2. templating: every string (keys and the top-level ``vars`` section excepted) containing
   ``{{`` or ``{%`` is rendered with jinja2 in a sandbox over ``vars``. A template that uses a
   list var as a whole value renders once per value (the cartesian product over several such
   vars); in a YAML list the results are spliced in place, in a scalar field they become a list.
3. validation with pydantic; each error is mapped back to FILE:LINE:COL with a plain message
   and, where possible, a hint.
4. cross-references: step ids unique across sections, ``from`` naming a step of a kind that
   the step can read.

Every problem a user can cause is raised as :class:`~caspec.errors.SpecError` (or
:class:`~caspec.errors.UsageError` for a file that cannot be read), never another exception.
"""
from __future__ import annotations

import contextvars
import copy
import difflib
import functools
import itertools
import json
import math
import re
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer
from pydantic import BaseModel, ValidationError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import Problem, SpecError, UsageError
from .models import SECTIONS, Spec

MAX_BYTES = 1 << 20
"""Largest spec file accepted (1 MiB)."""
MAX_NODES = 100_000
"""Most YAML nodes a document may expand to (aliases count each time they are used)."""
MAX_DEPTH = 64
"""Deepest nesting accepted."""
MAX_EXPANSION = 1000
"""Most values one template may expand into."""
MAX_RENDERED = 100_000
"""Longest string one template may render to (characters)."""

KEY = "__key__"
"""Last element of a positions path that locates a mapping key rather than its value."""

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG = "tag:yaml.org,2002:"
_MERGE_TAG = _TAG + "merge"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null")}
_LINE_BREAK = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")

Pos = tuple[int, int]


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from and where each of its values is written."""

    spec: Spec
    path: Path
    name: str
    dir: Path
    text: str
    positions: dict[tuple, tuple[int, int]]
    file: str = ""
    """The file as the user named it (used in messages); default: ``path``."""

    def problem(self, path: tuple, message: str, hint: str | None = None) -> Problem:
        """A :class:`Problem` at spec field ``path`` (or the nearest enclosing field with a known position)."""
        return _Source(self.file or str(self.path), self.text, self.positions).problem(path, message, hint)

    def where(self, path: tuple) -> str:
        """``FILE:LINE:COL`` of spec field ``path`` (nearest known position), or just ``FILE``."""
        shown = self.file or str(self.path)
        pos = _locate(self.positions, path)
        return f"{shown}:{pos[0]}:{pos[1]}" if pos else shown


def load_spec(path: str | Path, *, contained: bool = False) -> LoadedSpec:
    """Read, parse, template, validate and cross-check the spec file at ``path``. ``contained``: every path it
    names must stay inside its folder (:mod:`caspec.spec.contain`), checked before any of them is read."""
    shown = str(path)
    raw = _read_bytes(Path(path), shown)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError([Problem(shown, line, col, "", f"the file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                                 "save the spec as UTF-8 text")]) from None
    return _load(text, path, shown, contained)


def load_spec_text(text: str, path: str | Path, *, contained: bool = False) -> LoadedSpec:
    """Like :func:`load_spec` for spec text already in memory; ``path`` names it in messages and sets ``dir``."""
    shown = str(path)
    if len(text) > MAX_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SpecError([_too_large(shown, len(text.encode("utf-8", "surrogatepass")))])
    return _load(text, path, shown, contained)


# --------------------------------------------------------------------------- reading


def _read_bytes(path: Path, shown: str) -> bytes:
    try:
        if path.is_dir():
            raise UsageError(f"{shown} is a directory, not a spec file", "pass the path of a spec's .yaml file")
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SpecError([_too_large(shown, size)])
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"spec file not found: {shown}",
                         "check the path (relative paths start at the current directory)") from None
    except PermissionError:
        raise UsageError(f"cannot read spec file {shown}: permission denied", "check the file's permissions") from None
    except OSError as exc:
        raise UsageError(f"cannot read spec file {shown}: {exc.strerror or exc}", None) from None
    if len(raw) > MAX_BYTES:
        raise SpecError([_too_large(shown, len(raw))])
    return raw


def _too_large(shown: str, size: int) -> Problem:
    return Problem(shown, None, None, "",
                   f"file is too large for a spec ({size / (1 << 20):.1f} MiB; the limit is 1 MiB)",
                   "a spec is a small YAML file of steps; is this the right file?")


def _load(text: str, path: str | Path, shown: str, contained: bool = False) -> LoadedSpec:
    src = _Source(shown, text, {})
    data = _parse(src)
    data, src.positions, expanded = _template(data, src)
    spec = _validate(data, src, expanded)
    abspath = Path(path).absolute()
    name = spec.name or abspath.stem
    _fail_if(_check_steps(spec, src) + _check_name(spec, name, src))
    loaded = LoadedSpec(spec=spec, path=abspath, name=name, dir=abspath.parent, text=text,
                        positions=dict(src.positions), file=shown)
    if contained:  # before the checks below read asset folders the spec names
        from .contain import check_contained

        check_contained(loaded)
    _fail_if(_check_compose(spec, src, abspath.parent) + _check_export_eval(spec, src, abspath.parent))
    return loaded


def _fail_if(problems: list[Problem]) -> None:
    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.line or 0, p.col or 0)))


# --------------------------------------------------------------------------- positions and problems


class _Source:
    """The spec text, its display name and known positions: makes problems with the source line."""

    def __init__(self, shown: str, text: str, positions: dict[tuple, Pos]):
        self.shown = shown
        text = text[1:] if text.startswith("\ufeff") else text
        self.text = text
        self.lines = _LINE_BREAK.split(text)
        self.positions = positions

    def problem(self, path: tuple, message: str, hint: str | None = None, at: Pos | None = None) -> Problem:
        pos = at or _locate(self.positions, path)
        line, col = pos if pos else (None, None)
        source = self.lines[line - 1] if line is not None and 0 < line <= len(self.lines) else None
        return Problem(self.shown, line, col, _dotted(path), message, hint, source)


def _locate(positions: dict[tuple, Pos], path: tuple) -> Pos | None:
    """The position of ``path``, else of its nearest ancestor with one."""
    path = tuple(path)
    for end in range(len(path), -1, -1):
        pos = positions.get(path[:end])
        if pos is not None:
            return pos
    return None


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        if part == KEY:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _mark(node: Node) -> Pos:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _show(value: Any) -> str:
    """A value as a person reads it in YAML terms (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _yaml_kind(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return _show(value)
    return "an integer" if isinstance(value, int) else "a number"


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str | None:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean `{match[0]}`?" if match else None


def _ticks(names: typing.Iterable[Any]) -> str:
    return ", ".join(f"`{n}`" for n in names)


# --------------------------------------------------------------------------- phase 1: YAML


class _Abort(Exception):
    """Stops the YAML walk at once (limits), carrying the problem."""

    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


def _parse(src: _Source) -> dict:
    text = src.text
    try:
        root = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        raise SpecError([_syntax_problem(src, exc)]) from None
    except yaml.reader.ReaderError as exc:
        raise SpecError([_reader_problem(src, text, exc)]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        msg = "the document nests too deeply" if isinstance(exc, RecursionError) else f"invalid YAML: {exc}"
        raise SpecError([src.problem((), msg)]) from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == _TAG + "null"):
        raise SpecError([Problem(src.shown, None, None, "", "the spec is empty",
                                 "a spec is a YAML mapping; start with `version: 1` and a `roots:` section")])
    if not isinstance(root, MappingNode):
        kind = "a list" if isinstance(root, SequenceNode) else "a single value"
        raise SpecError([src.problem((), f"the top level of a spec must be a mapping (`key: value` lines), not {kind}",
                                     "start with `version: 1` and a `roots:` section", at=_mark(root))])
    builder = _Builder(src)
    try:
        data = builder.build(root, (), 0)
    except _Abort as abort:
        raise SpecError([abort.problem]) from None
    _fail_if(builder.problems)
    return data


_SYNTAX_HINTS = {
    "mapping values are not allowed": "a value containing `: ` must be quoted, e.g. `prompt: \"a robot: dancing\"`",
    "cannot start any token": ("YAML indentation uses spaces, not tabs; "
                               "a value starting with `@` or a backtick must be quoted"),
    "found undefined alias": "an alias `*name` must refer to an anchor `&name` defined earlier in the file",
    "expected a single document": "a spec is one YAML document; remove the extra `---`",
    "found character '\\t'": "YAML indentation uses spaces, not tabs",
}


def _syntax_problem(src: _Source, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    message = f"invalid YAML: {exc.problem or exc.context}"
    if exc.context and exc.problem:
        where = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{where})"
    hint = next((h for key, h in _SYNTAX_HINTS.items() if key in str(exc)), None)
    if exc.context_mark is not None and (mark is None or mark.index >= len(src.text.rstrip())):
        mark = exc.context_mark
        hint = hint or "this is never closed; check its closing quote or bracket"
        if exc.context == "while scanning a quoted scalar":
            message = "invalid YAML: this quoted string is never closed"
            hint = "add the closing quote (inside a \"...\" string, write a quote as \\\")"
    if hint is None and exc.context_mark is not None and str(exc.context).startswith("while parsing a flow"):
        brackets = "`{ ... }`" if "mapping" in exc.context else "`[ ... ]`"
        started = exc.context_mark.line + 1
        hint = f"look for a missing `,` or closing bracket in the {brackets} started at line {started}"
    unclosed = _unclosed_quote(src.text, mark.line if mark else None)
    inside = exc.context_mark is not None and unclosed is not None and unclosed[0] >= exc.context_mark.line + 1
    if inside and (mark is None or unclosed[0] < mark.line + 1):  # the quote opened inside what failed
        line, col = unclosed
        return src.problem((), "invalid YAML: this quoted string is not closed on its line",
                           f"add the closing quote; without it YAML reads on into the next lines and stops only at "
                           f"line {mark.line + 1 if mark else '?'} ({exc.problem or exc.context})", at=(line, col))
    at = (mark.line + 1, mark.column + 1) if mark else None
    return src.problem((), message, hint, at=at)


def _unclosed_quote(text: str, upto: int | None) -> tuple[int, int] | None:
    """``(line, column)`` of the first quote, on a line before ``upto`` (0-based) or the last, that opens a
    string and leaves it open at the end of its line (a likely typo, which YAML reports lines later)."""
    for number, line in enumerate(text.splitlines()[: None if upto is None else upto + 1], 1):
        quote, start, i = None, 0, 0
        while i < len(line):
            ch = line[i]
            if quote is None:
                if ch == "#" and (i == 0 or line[i - 1] in " \t"):
                    break
                if ch in "\"'" and (i == 0 or line[i - 1] in " \t[{,:-"):
                    quote, start = ch, i
            elif quote == '"' and ch == "\\":
                i += 1
            elif ch == quote:
                if quote == "'" and i + 1 < len(line) and line[i + 1] == "'":
                    i += 1
                else:
                    quote = None
            i += 1
        if quote is not None:
            return number, start + 1
    return None


def _reader_problem(src: _Source, text: str, exc: yaml.reader.ReaderError) -> Problem:
    pos = min(max(exc.position, 0), len(text))
    line = len(_LINE_BREAK.findall(text, 0, pos)) + 1
    start = max((m.end() for m in _LINE_BREAK.finditer(text, 0, pos)), default=0)
    char = exc.character if isinstance(exc.character, int) else ord(exc.character or "\0")
    return src.problem((), f"invalid YAML: character U+{char:04X} is not allowed in YAML text",
                       "remove the control character, or write it as an escape in a double-quoted string",
                       at=(line, pos - start + 1))


class _Builder:
    """Walks composed YAML nodes into plain data, recording positions and bounding the work."""

    def __init__(self, src: _Source):
        self.src = src
        self.positions = src.positions
        self.problems: list[Problem] = []
        self.count = 0
        self.constructor = SafeConstructor()

    def build(self, node: Node, path: tuple, depth: int) -> Any:
        self._tick(node, path, depth)
        self.positions[path] = _mark(node)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if not self._tag_ok(node, path):
            return None
        if isinstance(node, SequenceNode):
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        return self._mapping(node, path, depth)

    def _tick(self, node: Node, path: tuple, depth: int) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            raise _Abort(self.src.problem(path[:1], f"the document expands to more than {MAX_NODES} nodes (aliases?)",
                                          "each use of an alias `*name` copies its anchored node; "
                                          "a spec this large is probably an alias bomb",
                                          at=self.positions.get(path[:1] + (KEY,))))
        if depth > MAX_DEPTH:
            raise _Abort(self.src.problem(path[:2], f"the document nests deeper than {MAX_DEPTH} levels",
                                          "an alias inside its own anchor (`&a [*a]`) nests forever", at=_mark(node)))

    def _tag_ok(self, node: Node, path: tuple) -> bool:
        want = _TAG + ("seq" if isinstance(node, SequenceNode) else "map")
        if node.tag == want:
            return True
        self.problems.append(self._tag_problem(node, path))
        return False

    def _tag_problem(self, node: Node, path: tuple) -> Problem:
        return self.src.problem(path, f"unsupported YAML tag `{node.tag.replace(_TAG, '!!')}`",
                                "specs use plain YAML: mappings, lists, strings, numbers, booleans and null",
                                at=_mark(node))

    def _scalar(self, node: ScalarNode, path: tuple) -> Any:
        if node.tag == _TAG + "str" or node.tag == _TAG + "timestamp":
            return node.value
        if node.tag not in _SCALAR_TAGS:
            self.problems.append(self._tag_problem(node, path))
            return None
        try:
            return self.constructor.construct_object(node)
        except (ConstructorError, ValueError) as exc:  # pragma: no cover - resolved tags always construct
            self.problems.append(self.src.problem(path, f"invalid value: {exc}", at=_mark(node)))
            return None

    def _mapping(self, node: MappingNode, path: tuple, depth: int) -> dict:
        merged, merged_pos = self._merged(node, path, depth)
        out: dict = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, path, depth)
            if key is None:
                continue
            if key in seen:
                self.problems.append(self.src.problem(
                    path + (key,), f"duplicate key `{key}` (first at line {seen[key]})",
                    "remove one of them (YAML would silently keep the last)", at=_mark(key_node)))
                continue
            seen[key] = key_node.start_mark.line + 1
            merged.pop(key, None)
            merged_pos.pop(key, None)
            self.positions[path + (key, KEY)] = _mark(key_node)
            out[key] = self.build(value_node, path + (key,), depth + 1)
        for key, entries in merged_pos.items():
            self.positions.update(entries)
        return {**merged, **out}

    def _key(self, key_node: Node, path: tuple, depth: int) -> str | None:
        self._tick(key_node, path, depth + 1)
        if isinstance(key_node, ScalarNode):
            if key_node.tag not in _SCALAR_TAGS and key_node.tag != _TAG + "timestamp":
                self.problems.append(self._tag_problem(key_node, path))
                return None
            key = self._scalar(key_node, path)
            if isinstance(key, str):
                return key
            raw = key_node.value
            message = f"key `{raw}` is not a string (YAML reads it as {_yaml_kind(key)})"
            hint = f"quote it: `\"{raw}\":`"
        else:
            message, hint = "keys must be plain strings, not lists or mappings", None
        self.problems.append(self.src.problem(path, message, hint, at=_mark(key_node)))
        return None

    def _merged(self, node: MappingNode, path: tuple, depth: int) -> tuple[dict, dict]:
        """Values and positions from ``<<`` merge keys (earlier sources win, explicit keys win over all)."""
        values: dict = {}
        positions: dict[Any, dict] = {}
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            for source in self._merge_sources(value_node, path, depth):
                saved, self.positions = self.positions, {}
                try:
                    items = self._mapping(source, path, depth + 1)
                finally:
                    found, self.positions = self.positions, saved
                fresh = {k for k in items if k not in values}
                for p, pos in found.items():
                    if len(p) > len(path) and p[len(path)] in fresh:
                        positions.setdefault(p[len(path)], {})[p] = pos
                values.update({k: items[k] for k in items if k in fresh})
        return values, positions

    def _merge_sources(self, node: Node, path: tuple, depth: int) -> list[MappingNode]:
        self._tick(node, path, depth + 1)
        items = node.value if isinstance(node, SequenceNode) else [node]
        if all(isinstance(item, MappingNode) for item in items):
            return list(items)
        self.problems.append(self.src.problem(path, "a merge key `<<` needs a mapping or a list of mappings",
                                              "write `<<: *anchor` where `&anchor` marks a mapping", at=_mark(node)))
        return []


# --------------------------------------------------------------------------- phase 2: templates

_LIST_FILTERS = frozenset({
    "join", "length", "count", "first", "last", "sort", "unique", "list", "min", "max", "sum",
    "reverse", "batch", "slice", "map", "select", "reject", "random", "selectattr", "rejectattr",
})
"""Filters that take a whole list: a list var they are applied to is not expanded."""
_UNSAFE_FILTERS = ("center", "format", "indent", "wordwrap", "urlize", "xmlattr", "pprint")
_UNSAFE_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"})


MAX_STEPS = 100_000
"""Most loop iterations one template may run, over all its loops."""
MAX_SECONDS = 1.0
"""Longest one template may take to render."""


class OverBudget(SecurityError):
    """A template that would run too long or build too large a value (the render stops there)."""


class _Budget:
    """What one template render may spend: loop iterations and time (checked while it runs)."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def spend(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise OverBudget(f"the template runs more than {MAX_STEPS} loop iterations")
        if not self.steps % 256 and time.monotonic() > self.deadline:
            raise OverBudget(f"the template takes longer than {MAX_SECONDS:g} s to render")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OverBudget(f"the template takes longer than {MAX_SECONDS:g} s to render")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("caspec_template_budget", default=None)


def _spend() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.spend()


def _sized(value: Any) -> Any:
    """``value``, refused when it is a string or sequence longer than :data:`MAX_RENDERED`."""
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_RENDERED:
        raise OverBudget(f"the template builds a value longer than {MAX_RENDERED} characters")
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()
    return value


class _Counted:
    """An iterable whose iteration spends the render's loop budget (``for`` loops and ``range``)."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __iter__(self) -> Any:
        for item in self.items:
            _spend()
            yield item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]


def _capped_range(*args: int) -> _Counted:
    r = range(*args)
    if len(r) > MAX_EXPANSION:
        raise SecurityError(f"range() is limited to {MAX_EXPANSION} items in specs")
    return _Counted(r)


def _sized_filter(func: Any) -> Any:
    """A filter whose result is size-checked (chained ``replace`` cannot build gigabytes)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _sized(func(*args, **kwargs))

    return functools.update_wrapper(wrapper, func)


class _Bounded(NodeTransformer):
    """Rewrites a template's AST so its work is bounded while it renders: every ``for`` loop iterates through
    the loop budget, every ``~`` concatenation is size-checked."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "caspec_counted", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Filter(node, "caspec_sized", [], [], None, None, lineno=node.lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, also refusing operations that build huge values."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False)
        self.globals = {"range": _capped_range, "dict": dict}
        for name in _UNSAFE_FILTERS:
            self.filters.pop(name, None)
        self.filters = {name: _sized_filter(f) for name, f in self.filters.items()}
        self.filters["caspec_counted"] = _Counted
        self.filters["caspec_sized"] = _sized

    def bounded(self, ast: nodes.Template) -> Any:
        """A template compiled from ``ast`` with its loops and concatenations bounded (:class:`_Bounded`)."""
        return self.from_string(_Bounded().visit(copy.deepcopy(ast)))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _UNSAFE_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and isinstance(left, int) and not isinstance(right, bool):
            if right > 64 and abs(left) > 1 and abs(left).bit_length() * right > 4096:
                raise SecurityError("the result of `**` would be too large")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED:
                raise SecurityError("the result of `*` would be too large")
        return _sized(super().call_binop(context, operator, left, right))


def _whole_list_use(node: nodes.Name, parent: nodes.Node | None) -> bool:
    """Whether ``node`` uses its variable as a whole list (subscript, loop, list filter, `in`)."""
    if isinstance(parent, (nodes.Getitem, nodes.Getattr)) and parent.node is node:
        return True
    if isinstance(parent, nodes.Filter) and parent.node is node and parent.name in _LIST_FILTERS:
        return True
    if isinstance(parent, nodes.For) and parent.iter is node:
        return True
    return isinstance(parent, nodes.Operand) and parent.op in ("in", "notin")


def _element_uses(ast: nodes.Node, names: set[str]) -> set[str]:
    """The list vars in ``names`` that the template uses as single values (so it expands over them)."""
    found: set[str] = set()

    def walk(node: nodes.Node, parent: nodes.Node | None) -> None:
        if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names:
            if not _whole_list_use(node, parent):
                found.add(node.name)
        for child in node.iter_child_nodes():
            walk(child, node)

    walk(ast, None)
    return found


@dataclass
class _Expansion:
    names: list[str]
    count: int


class _Templater:
    """Renders templated strings over ``vars``, splicing list expansions and carrying positions over."""

    def __init__(self, variables: dict, src: _Source):
        self.env = _Sandbox()
        self.vars = variables
        self.src = src
        self.old = src.positions
        self.new: dict[tuple, Pos] = {}
        self.problems: list[Problem] = []
        self.expanded: dict[tuple, _Expansion] = {}

    def run(self, data: dict) -> dict:
        self._carry((), ())
        out = {}
        for key, value in data.items():
            path = (key,)
            out[key] = self._copy(value, path, path) if key == "vars" else self._value(value, path, path)
        return out

    def _carry(self, old: tuple, new: tuple) -> None:
        for suffix in ((), (KEY,)):
            if old + suffix in self.old:
                self.new[new + suffix] = self.old[old + suffix]

    def _copy(self, value: Any, old: tuple, new: tuple) -> Any:
        self._carry(old, new)
        if isinstance(value, dict):
            return {k: self._copy(v, old + (k,), new + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._copy(v, old + (i,), new + (i,)) for i, v in enumerate(value)]
        return value

    def _value(self, value: Any, old: tuple, new: tuple) -> Any:
        self._carry(old, new)
        if isinstance(value, dict):
            return {k: self._value(v, old + (k,), new + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return self._list(value, old, new)
        if not _is_template(value):
            return value
        results = self._render(value, old)
        if len(results) == 1:
            return results[0]
        self.expanded[new] = _Expansion(self._expanded_names(value), len(results))
        for i in range(len(results)):
            self.new[new + (i,)] = self.old[old]
        return results

    def _list(self, items: list, old: tuple, new: tuple) -> list:
        out: list = []
        for i, item in enumerate(items):
            if _is_template(item):
                results = self._render(item, old + (i,))
                if not results:
                    self.expanded[new] = _Expansion(self._expanded_names(item), 0)
                for result in results:
                    self.new[new + (len(out),)] = self.old[old + (i,)]
                    out.append(result)
            else:
                out.append(self._value(item, old + (i,), new + (len(out),)))
        return out

    def _expanded_names(self, text: str) -> list[str]:
        try:
            return self._list_names(self.env.parse(text))
        except TemplateSyntaxError:  # pragma: no cover - already rendered once
            return []

    def _list_names(self, ast: nodes.Template) -> list[str]:
        lists = {k for k, v in self.vars.items() if isinstance(v, list)}
        used = _element_uses(ast, lists)
        return [k for k in self.vars if k in used]

    def _render(self, text: str, path: tuple) -> list[str]:
        """The rendered values of one template string ([text] after recording a problem)."""
        try:
            ast = self.env.parse(text)
            referenced = meta.find_undeclared_variables(ast)
            template = self.env.bounded(ast)
        except TemplateSyntaxError as exc:  # also TemplateAssertionError: an unknown filter or test
            return self._fail(path, f"template syntax error: {exc.message}", self._syntax_hint(exc), text)
        except Exception as exc:  # noqa: BLE001 - compiling folds constants, evaluating (sandboxed) expressions
            return self._fail(path, *_render_error(exc), text)
        undefined = sorted(referenced - set(self.vars) - set(self.env.globals))
        if undefined:
            return self._fail(path, f"undefined template variable {_ticks(undefined)}",
                              self._vars_hint(undefined[0]), text)
        names = self._list_names(ast)
        count = math.prod(len(self.vars[n]) for n in names)
        if count > MAX_EXPANSION:
            return self._fail(path, f"the template expands to {count} values (the limit is {MAX_EXPANSION})",
                              f"it expands over the list vars {_ticks(names)}", text)
        out = []
        for combo in itertools.product(*(self.vars[n] for n in names)):
            token = _BUDGET.set(_Budget())
            try:
                result = _render_bounded(template, {**self.vars, **dict(zip(names, combo))})
            except Exception as exc:  # noqa: BLE001 - whatever the template's expressions raise
                return self._fail(path, *_render_error(exc), text)
            finally:
                _BUDGET.reset(token)
            if result is None:
                return self._fail(path, f"the template renders to more than {MAX_RENDERED} characters", None, text)
            out.append(result)
        return out

    def _fail(self, path: tuple, message: str, hint: str | None, text: str) -> list[str]:
        self.problems.append(self.src.problem(path, message, hint))
        return [text]

    def _syntax_hint(self, exc: TemplateSyntaxError) -> str:
        unknown = re.match(r"No (filter|test) named '([^']*)'", exc.message or "")
        if unknown:
            kind, name = unknown.groups()
            known = self.env.filters if kind == "filter" else self.env.tests
            return _did_you_mean(name, known) or f"{kind}s: {', '.join(sorted(known))}"
        return ("`{{ ... }}` holds one expression such as `{{ color }}` or `{{ color | upper }}`, "
                "`{% ... %}` a statement; close each with `}}` or `%}`")

    def _vars_hint(self, name: str) -> str:
        if not self.vars:
            return "no vars are defined; add a top-level `vars:` mapping, e.g. `vars: {color: [silver, gold]}`"
        defined = f"defined vars: {_ticks(self.vars)}"
        guess = _did_you_mean(name, self.vars)
        return f"{guess} ({defined})" if guess else defined


def _render_bounded(template: Any, context: dict[str, Any]) -> str | None:
    """Render chunk by chunk, stopping as soon as the output passes :data:`MAX_RENDERED` (None then)."""
    parts, size = [], 0
    for chunk in template.generate(context):
        size += len(chunk)
        if size > MAX_RENDERED:
            return None
        parts.append(chunk)
    return "".join(parts)


_SANDBOX_HINT = "templates may use vars, filters and plain expressions; they cannot reach Python internals"
_BOUNDS_HINT = (f"a template may run at most {MAX_STEPS} loop iterations, build values of at most {MAX_RENDERED} "
                f"characters and take at most {MAX_SECONDS:g} s: specs are small, write the values out")


def _render_error(exc: Exception) -> tuple[str, str | None]:
    """Message and hint for an exception raised while compiling or rendering a template."""
    if isinstance(exc, OverBudget):
        return f"template refused by the sandbox: {exc}", _BOUNDS_HINT
    if isinstance(exc, SecurityError):
        return f"template refused by the sandbox: {exc}", _SANDBOX_HINT
    if isinstance(exc, TemplateError):
        return f"template error: {exc.message or exc}", None
    return f"template error: {type(exc).__name__}: {exc}", None


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _template(data: dict, src: _Source) -> tuple[dict, dict, dict]:
    variables = data.get("vars")
    templater = _Templater(variables if isinstance(variables, dict) else {}, src)
    out = templater.run(data)
    _fail_if(templater.problems)
    return out, templater.new, templater.expanded


# --------------------------------------------------------------------------- phase 3: validation

_FIELD_HINTS = {
    "strength": "strength is the fraction of the DDIM schedule to noise, in (0, 1]; the paper uses 0.86",
    "resolution": ("resolution is the square image size in pixels: a multiple of 8 in [16, 4096] "
                   "(64 for `tiny`, 512 for SD 1.x)"),
}
_STEP_ID_HINT = "step ids start with a letter, then up to 63 letters, digits, `-` or `_`"
_NAME_HINT = "a name starts with a letter or digit, then up to 63 letters, digits, `.`, `-` or `_`"
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "a boolean (true/false)", "bool_parsing": "a boolean (true/false)",
    "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}
_RANGE_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _validate(data: dict, src: _Source, expanded: dict[tuple, _Expansion]) -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    _fail_if(_ErrorMapper(data, src, expanded).problems(errors) or [src.problem((), "the spec is not valid")])
    raise AssertionError("unreachable")  # pragma: no cover


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional so that a model, dict or list type shows."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _field_name(model: type[BaseModel], key: Any) -> str | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return name
    return None


def _resolve(loc: tuple) -> tuple[Any, Any]:
    """Follow ``loc`` through the schema: (type at the end, FieldInfo of the last model field passed)."""
    tp, info = Spec, None
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            name = _field_name(tp, part)
            if name is not None:
                info = tp.model_fields[name]
                tp = info.annotation
        elif typing.get_origin(tp) is dict and part != "[key]":
            tp, info = typing.get_args(tp)[1], None
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp, info = typing.get_args(tp)[0], None
    return _unwrap(tp), info


def _aliases(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _range_text(info: Any) -> str | None:
    lo = hi = None
    for meta_item in getattr(info, "metadata", []):
        for attr, side, text in (("gt", "lo", "({}"), ("ge", "lo", "[{}"), ("lt", "hi", "{})"), ("le", "hi", "{}]")):
            value = getattr(meta_item, attr, None)
            if value is not None:
                if side == "lo":
                    lo = (text, value)
                else:
                    hi = (text, value)
    if lo and hi:
        return f"{lo[0].format(lo[1])}, {hi[0].format(hi[1])}"
    if lo:
        return (">" if lo[0].startswith("(") else ">=") + f" {lo[1]}"
    if hi:
        return ("<" if hi[0].endswith(")") else "<=") + f" {hi[1]}"
    return None


class _ErrorMapper:
    """Turns pydantic errors into problems at the YAML positions of the offending values."""

    def __init__(self, data: dict, src: _Source, expanded: dict[tuple, _Expansion]):
        self.data = data
        self.src = src
        self.expanded = expanded

    def problems(self, errors: list[dict]) -> list[Problem]:
        groups: dict[tuple, list[dict]] = {}
        for err in errors:
            path, on_key = self._data_path(err["loc"])
            tag = err["loc"][-1] if err["type"] in ("missing", "extra_forbidden") else None
            groups.setdefault((path, on_key, tag), []).append(err)
        out = []
        for (path, on_key, _), errs in groups.items():
            if len(errs) > 1 and all(e["type"] in _EXPECTED for e in errs):
                if not any(len(other) > len(path) and other[:len(path)] == path for other, _, _ in groups):
                    out.append(self._union_problem(path, errs))
            else:
                out.extend(self._problem(path, on_key, err) for err in errs)
        return out

    def _data_path(self, loc: tuple) -> tuple[tuple, bool]:
        """The part of ``loc`` that names data (skipping union and validator tags), and whether it is about a key."""
        node, path, on_key = self.data, [], False
        for part in loc:
            if part == "[key]":
                on_key = True
            elif isinstance(node, dict) and not isinstance(part, int) and part in node:
                node = node[part]
                path.append(part)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
                path.append(part)
        return tuple(path), on_key

    def _at(self, path: tuple, key: bool) -> Pos | None:
        if key and path + (KEY,) in self.src.positions:
            return self.src.positions[path + (KEY,)]
        return None

    def _problem(self, path: tuple, on_key: bool, err: dict) -> Problem:
        kind = err["type"]
        if kind == "missing":
            return self._missing(path, err)
        if kind == "extra_forbidden":
            return self._extra(path, err)
        message, hint = self._describe(path, err)
        container = isinstance(self._value(path), (dict, list)) and kind not in _EXPECTED
        return self.src.problem(path, message, hint, at=self._at(path, on_key or container))

    def _value(self, path: tuple) -> Any:
        node = self.data
        for part in path:
            node = node[part]
        return node

    def _missing(self, path: tuple, err: dict) -> Problem:
        name = err["loc"][-1]
        _, info = _resolve(err["loc"])
        hint = f"add `{name}:`"
        if info is not None and info.description:
            hint += f" ({info.description})"
        return self.src.problem(path, f"missing required field `{name}`", hint, at=self._at(path, True))

    def _extra(self, path: tuple, err: dict) -> Problem:
        key = err["loc"][-1]
        model, _ = _resolve(err["loc"][:-1])
        allowed = _aliases(model) if isinstance(model, type) and issubclass(model, BaseModel) else []
        hint = _did_you_mean(key, allowed) or (f"allowed fields: {', '.join(allowed)}" if allowed else None)
        return self.src.problem(path, f"unknown field `{key}`", hint, at=self._at(path, True))

    def _describe(self, path: tuple, err: dict) -> tuple[str, str | None]:
        kind, msg, value = err["type"], err["msg"], err.get("input")
        _, info = _resolve(err["loc"])
        field_name = next((p for p in reversed(err["loc"]) if isinstance(p, str) and p in path), None)
        expansion = self.expanded.get(path)
        if expansion is not None and kind in _EXPECTED:
            return self._expansion_message(field_name, expansion)
        if expansion is not None and expansion.count == 0 and kind == "too_short":
            names = _ticks(expansion.names)
            return (f"`{field_name}` is empty: its template expands over the empty list var(s) {names}",
                    "give the list var at least one value")
        if path == ("model",) and kind in _EXPECTED:
            return (f"expected a model name or a mapping, got {_show(value)}",
                    "`model: tiny`, a local diffusers folder or a hub id; "
                    "or a mapping with `base`, `revision`, `dtype`, `device`")
        if kind in _EXPECTED:
            return f"expected {_EXPECTED[kind]}, got {_show(value)}", self._description(info, field_name)
        if kind in _RANGE_TYPES:
            return f"{_show(value)} is out of range: {msg}", self._range_hint(field_name, info)
        if kind == "multiple_of":
            return f"{_show(value)} is not allowed: {msg}", _FIELD_HINTS.get(field_name)
        if kind == "literal_error":
            return f"{_show(value)} is not allowed: {msg}", self._literal_hint(info, err)
        if kind == "string_pattern_mismatch":
            if err["loc"][:1] == ("name",):
                return f"{_show(value)} is not a valid name", _NAME_HINT
            if err["loc"][-1:] == ("token",):
                return (f"{_show(value)} is not a valid pseudo-word",
                        "write pseudo-words in angle brackets, letters and digits only, e.g. `<dance1>`; "
                        "`{k}` inside (`<robot{k}>`) makes one word per image")
            return f"{_show(value)} is not a valid step id", _STEP_ID_HINT
        if kind == "value_error":
            return msg.removeprefix("Value error, "), None
        if kind in ("string_too_short", "too_short") and value in ("", []):
            return f"`{field_name}` must not be empty" if field_name else msg, self._description(info, field_name)
        return f"{msg} (got {_show(value)})", self._description(info, field_name)

    def _expansion_message(self, field_name: str | None, expansion: _Expansion) -> tuple[str, str]:
        names = _ticks(expansion.names)
        first = expansion.names[0] if expansion.names else "var"
        message = f"the template expands to {expansion.count} values, but `{field_name}` takes one value"
        hint = (f"this template expands over list var(s) {names} ({expansion.count} values); use it in a list field "
                f"such as `edits.<id>.prompts`, or pick one value: `{{{{ {first}[0] }}}}`")
        return message, hint

    @staticmethod
    def _description(info: Any, field_name: str | None) -> str | None:
        desc = getattr(info, "description", None)
        return f"`{field_name}`: {desc}" if desc and field_name else desc

    @staticmethod
    def _range_hint(field_name: str | None, info: Any) -> str | None:
        if field_name in _FIELD_HINTS:
            return _FIELD_HINTS[field_name]
        allowed = _range_text(info)
        if allowed is None:
            return None
        hint = f"`{field_name}` must be in {allowed}" if "," in allowed else f"`{field_name}` must be {allowed}"
        desc = getattr(info, "description", None)
        return f"{hint}: {desc[0].lower()}{desc[1:]}" if desc else hint

    @staticmethod
    def _literal_hint(info: Any, err: dict) -> str | None:
        tp = _unwrap(getattr(info, "annotation", None))
        if typing.get_origin(tp) is typing.Literal:
            return "allowed values: " + ", ".join(str(a) for a in typing.get_args(tp))
        expected = (err.get("ctx") or {}).get("expected")
        return f"allowed values: {expected}" if expected else None

    def _union_problem(self, path: tuple, errs: list[dict]) -> Problem:
        wanted = list(dict.fromkeys(_EXPECTED[e["type"]] for e in errs))
        text = ", ".join(wanted[:-1]) + f" or {wanted[-1]}" if len(wanted) > 1 else wanted[0]
        hint = None
        if path[:1] == ("vars",):
            hint = "a var is a string, number or boolean, or a list of them"
        return self.src.problem(path, f"expected {text}, got {_show(errs[0].get('input'))}", hint)


# --------------------------------------------------------------------------- phase 4: cross-references

_READS_FROM = {"edits": ("roots", "select"), "select": ("roots", "edits"), "concepts": ("select", "roots", "edits")}
_WRONG_KIND_HINT = {
    ("edits", "edits"): "to edit an edit's candidates, add a `select` step over `{ref}` and edit that",
    ("select", "select"): "select from the step that `{ref}` selects from",
}


def _check_steps(spec: Spec, src: _Source) -> list[Problem]:
    owners: dict[str, str] = {}
    problems = []
    order = sorted(spec.steps(), key=lambda s: src.positions.get((s[0], s[1], KEY), (0, 0)))
    for section, step_id, _ in order:
        if step_id in owners:
            first = src.positions.get((owners[step_id], step_id, KEY), (0, 0))[0]
            used = f"{owners[step_id]}.{step_id}"
            problems.append(src.problem(
                (section, step_id, KEY), f"step id `{step_id}` is already used by `{used}` (line {first})",
                "step ids must be unique across all sections; rename one of them"))
        else:
            owners[step_id] = section
    for section, step_id, step in spec.steps():
        if section in _READS_FROM:
            problem = _check_ref(section, step_id, step.from_, owners, src)
            if problem is not None:
                problems.append(problem)
    return problems + _check_pseudo_words(spec, src)


_WORD_IN_TEXT = re.compile(r"<[^<>\s]+>")
_RESERVED_TOKENS = {"<|startoftext|>", "<|endoftext|>"}


def _word_regex(token: str) -> re.Pattern:
    return re.compile(re.escape(token).replace(re.escape("{k}"), r"[0-9]+") + "$")


def _tokens_overlap(a: str, b: str) -> bool:
    """Whether two pseudo-word templates can produce the same word (`<robot{k}>` vs `<robot2>`)."""
    if a == b:
        return True
    probe = lambda t: t.replace("{k}", "1")  # noqa: E731 - a literal instance of a template
    return bool(_word_regex(a).match(probe(b)) or _word_regex(b).match(probe(a)))


def _check_pseudo_words(spec: Spec, src: _Source) -> list[Problem]:
    """Pseudo-words unique within and across concepts; captions and previews use only defined ones."""
    problems: list[Problem] = []
    seen: list[tuple[str, str, int]] = []  # (token, concept id, index)
    for cid, concept in spec.concepts.items():
        for i, word in enumerate(concept.words):
            path = ("concepts", cid, "words", i, "token")
            clash = next(((t, c) for t, c, _ in seen if _tokens_overlap(t, word.token)), None)
            if word.token in _RESERVED_TOKENS:
                problems.append(src.problem(path, f"`{word.token}` is one of CLIP's special tokens",
                                            "choose a new pseudo-word such as `<dance1>`"))
            elif clash is not None:
                where = "this concept" if clash[1] == cid else f"concept `{clash[1]}`"
                problems.append(src.problem(path, f"pseudo-word `{word.token}` collides with `{clash[0]}` of {where}",
                                            "every pseudo-word must be unique in the spec; rename one of them"))
            seen.append((word.token, cid, i))
        regexes = [_word_regex(w.token) for w in concept.words]
        texts = [(("caption",), concept.caption)] if concept.caption is not None else []
        texts += [(("preview_prompts", j), p) for j, p in enumerate(concept.preview_prompts or [])]
        for sub, text in texts:
            for used in _WORD_IN_TEXT.findall(text):
                if not any(r.match(used.replace("{k}", "1")) for r in regexes):
                    defined = ", ".join(f"`{w.token}`" for w in concept.words)
                    problems.append(src.problem(("concepts", cid, *sub), f"`{used}` is not a pseudo-word of this concept",
                                                f"defined here: {defined}; add it to `words` or fix the spelling"))
    return problems


def _check_ref(section: str, step_id: str, ref: str, owners: dict[str, str], src: _Source) -> Problem | None:
    allowed = _READS_FROM[section]
    where = " or ".join(f"`{s}`" for s in allowed)
    path = (section, step_id, "from")
    if ref not in owners:
        candidates = [sid for sid, sec in owners.items() if sec in allowed]
        hint = _did_you_mean(ref, candidates)
        if hint is None:
            hint = (f"`from` names a step in {where}: {_ticks(candidates)}" if candidates
                    else f"`from` names a step in {where}, and there are none")
        return src.problem(path, f"unknown step `{ref}`", hint)
    if owners[ref] not in allowed:
        hint = _WRONG_KIND_HINT.get((section, owners[ref]), "").format(ref=ref) or None
        return src.problem(path, f"`{ref}` is {_a(SECTIONS[owners[ref]])} step; {_a(SECTIONS[section])} step reads "
                                 f"from a step in {where}", hint)
    return None


def is_asset_path(asset: str) -> bool:
    """A compose asset is a folder path when it contains `/` (`./robot`, `library/robot`), else a step id."""
    return "/" in asset


def asset_words(spec: Spec, asset: str, spec_dir: Path) -> list[str] | None:
    """Pseudo-words (templates with `{k}` allowed) an asset of a compose step defines: a `concepts` step's
    words, or the tokens on an asset folder's card (a path: it contains `/`). None when it names neither."""
    if not is_asset_path(asset):
        return [w.token for w in spec.concepts[asset].words] if asset in spec.concepts else None
    card = spec_dir / asset / "card.yaml"
    if not card.is_file():
        return None
    try:
        data = yaml.safe_load(card.read_text(encoding="utf-8")) or {}
        return [str(w["token"]) for w in data.get("pseudo_words", [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _check_compose(spec: Spec, src: _Source, spec_dir: Path) -> list[Problem]:
    """Compose assets exist, define disjoint pseudo-words, and cover every pseudo-word in the prompts."""
    problems: list[Problem] = []
    for cid, step in spec.compose.items():
        words: list[tuple[str, str]] = []  # (word template, asset)
        for i, asset in enumerate(step.assets):
            found = asset_words(spec, asset, spec_dir)
            if found is None:
                if is_asset_path(asset):
                    message = f"no concept asset folder (with card.yaml) at `{asset}`"
                    hint = "asset folder paths are relative to the spec file"
                else:
                    message = f"`{asset}` is not a `concepts` step"
                    hint = _did_you_mean(asset, list(spec.concepts)) or (
                        "name a `concepts` step, or an asset folder as a path (`./name` or `library/name`)")
                problems.append(src.problem(("compose", cid, "assets", i), message, hint))
                continue
            for word in found:
                clash = next((a for w, a in words if _tokens_overlap(w, word)), None)
                if clash is not None:
                    problems.append(src.problem(("compose", cid, "assets", i), f"assets `{clash}` and `{asset}` both "
                                                f"define the pseudo-word `{word}`",
                                                "a prompt could not tell them apart; compose them in separate steps"))
                words.append((word, asset))
        for name in step.asset_scales:
            if name not in step.assets:
                problems.append(src.problem(("compose", cid, "asset_scales", name), f"`{name}` is not one of this "
                                            "step's assets", _did_you_mean(name, step.assets)))
        regexes = [_word_regex(w) for w, _ in words]
        for j, prompt in enumerate(step.prompts):
            for used in _WORD_IN_TEXT.findall(prompt):
                if words and not any(r.match(used) for r in regexes):
                    defined = ", ".join(f"`{w}`" for w, _ in words)
                    problems.append(src.problem(("compose", cid, "prompts", j), f"no asset of this step defines "
                                                f"the pseudo-word `{used}`", f"defined: {defined}"))
    return problems


def _check_export_eval(spec: Spec, src: _Source, spec_dir: Path) -> list[Problem]:
    """`export.*.asset` names a concepts step or an asset folder; `eval.*.from` names compose steps."""
    problems: list[Problem] = []
    for sid, step in spec.export.items():
        if asset_words(spec, step.asset, spec_dir) is None:
            hint = _did_you_mean(step.asset, list(spec.concepts)) or "name a `concepts` step, or an asset folder path"
            problems.append(src.problem(("export", sid, "asset"), f"`{step.asset}` is neither a `concepts` step nor "
                                        "an asset folder", hint))
    for sid, step in spec.eval.items():
        for i, ref in enumerate(step.from_):
            if ref not in spec.compose:
                hint = _did_you_mean(ref, list(spec.compose)) or f"compose steps: {_ticks(list(spec.compose)) or 'none'}"
                problems.append(src.problem(("eval", sid, "from", i), f"`{ref}` is not a `compose` step", hint))
    return problems + _check_clips(spec, src, spec_dir)


def _check_clips(spec: Spec, src: _Source, spec_dir: Path) -> list[Problem]:
    """Every CLIP (`select` by clip, `eval`) has weights that can be found, before anything runs: a tag
    whose weights are in the local cache, a checkpoint file, weights caspec ships, or random weights only
    where asked for by name (`pretrained: random`) or where the model is `tiny`/`toy`. Pure: no torch."""
    from .models import ClipSelect

    steps = [(("eval", sid), step.clip) for sid, step in spec.eval.items()]
    steps += [(("select", sid), step.clip or ClipSelect()) for sid, step in spec.select.items() if step.by == "clip"]
    if not steps:
        return []  # no CLIP: spare the import
    from ..metrics.clip import ClipWeightsError, check_weights, for_spec

    problems = []
    for where, clip in steps:
        try:
            check_weights(for_spec(clip.model, clip.pretrained, clip.checkpoint, spec.model.base), spec_dir)
        except ClipWeightsError as exc:
            # no `clip:` block (the defaults): point at `by: clip`, the line that asked for a CLIP
            at = None if (*where, "clip") in src.positions else src.positions.get((*where, "by"))
            problems.append(src.problem((*where, "clip", exc.field), exc.message, exc.hint, at=at))
    return problems


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_name(spec: Spec, name: str, src: _Source) -> list[Problem]:
    if spec.name is not None or _NAME_RE.match(name):
        return []
    return [Problem(src.shown, None, None, "", f"the file name `{name}` cannot name the outputs",
                    f"add a `name:` to the spec; {_NAME_HINT}")]


__all__ = ["LoadedSpec", "load_spec", "load_spec_text", "KEY", "MAX_BYTES", "MAX_NODES", "MAX_DEPTH"]
