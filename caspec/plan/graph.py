"""PLAN: compile a loaded spec into a DAG of steps with cache keys. Pure: reads, never writes.

``make_plan(loaded, store)`` resolves each step's op parameters, hashes its input files, reads review
decisions, derives keys in dependency order, and asks the store (read-only) what is cached.
Statuses: ``cached``, ``run``, ``awaiting-review`` (a gate without a decision), ``blocked``
(something upstream waits for review). Each status carries human reasons.

A key contains the *content* of the upstream records a step consumes (``keys.content_digest``). Where
every upstream step is cached the key is exact. Where one will run first, its content is not known yet:
the key is *provisional* (``Node.provisional``), computed from the upstream's current record if it has
one (what the key will be if its outputs come out unchanged, e.g. under ``--force``), else from a
stand-in; the status is ``run``, "after `x` runs", and the executor re-keys the step once `x` is done.
Cached steps made under another environment (libraries, device, thread count) carry ``notes``.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..ops import get_op
from ..ops.base import GateState, Op
from ..spec.models import kind_of
from .keys import cache_key, content_digest, diff_material, key_material, pending_content

CACHED, RUN, AWAITING, BLOCKED = "cached", "run", "awaiting-review", "blocked"


@dataclass
class Node:
    id: str
    kind: str
    section: str
    step: Any
    op: Op
    params: dict[str, Any]
    inputs: dict[str, Path]
    upstream: dict[str, str]  # role -> step id
    gate: GateState | None = None
    input_digests: dict[str, str] = field(default_factory=dict)
    material: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    status: str = RUN
    reasons: list[str] = field(default_factory=list)
    # upstream step ids that run before this one: the key is provisional until they have
    pending: list[str] = field(default_factory=list)
    # for a cached step: where the environment that made it differs from this one (name -> (made, now))
    environment_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: Any = None  # the ModelSpec this step names for itself (None: the spec's)
    facts: dict[str, Any] = field(default_factory=dict)  # what planning shows about the step (an edit's start)
    model_identity: dict[str, Any] | None = None  # its identity, when it names one

    @property
    def provisional(self) -> bool:
        """The key depends on outputs of upstream steps that have not run yet."""
        return bool(self.pending)

    @property
    def short_key(self) -> str:
        return ("~" if self.provisional else "") + self.key[:12]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "key": self.key, "provisional": self.provisional,
                "status": self.status, "reasons": self.reasons, "notes": self.notes,
                "environment_changes": {k: {"made": a, "now": b} for k, (a, b) in self.environment_changes.items()},
                "upstream": sorted(set(self.upstream.values())), **self.facts}

    @property
    def fact_notes(self) -> list[str]:
        """:attr:`facts` in words, for the plan table."""
        start = self.facts.get("edit_start")
        return [f"starts at step {start['step']} of {start['steps']}, σ {start['sigma']:.3f}"] if start else []


@dataclass
class Plan:
    loaded: Any
    nodes: dict[str, Node]  # in topological order
    model_identity: dict[str, Any] | None
    compute: Any = None  # caspec.exec.compute.Compute: the device and threads the keys promise

    def order(self) -> list[Node]:
        return list(self.nodes.values())

    def ancestors(self, step_id: str) -> set[str]:
        seen: set[str] = set()
        todo = [step_id]
        while todo:
            for up in self.nodes[todo.pop()].upstream.values():
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen


def _file_digest(path: Path, digests: dict[Path, str]) -> str:
    from ..store.hashing import sha256_file

    if path not in digests:
        try:
            digests[path] = sha256_file(path)
        except OSError as exc:
            digests[path] = f"missing:{exc.strerror}"
    return digests[path]


def build_nodes(loaded: Any) -> dict[str, Node]:
    """One node per spec step, in topological order; a cycle is a PlanError naming its steps."""
    spec = loaded.spec
    raw: dict[str, Node] = {}
    families_of: dict[str, Any] = {}
    for section, step_id, step in spec.steps():
        kind = kind_of(section, step)
        op = get_op(kind)
        own = op.model_of(step)
        if op.USES_FAMILY:
            family = _family_of(own or spec.model, loaded, families_of, (section, step_id, "model") if own else
                                ("model",))
            params = op.params(step, spec, family=family)
            _check_scheduler(loaded, section, step_id, params, family)
            facts = op.plan_facts(step_id, step, params, family, loaded)
        else:
            params, facts = op.params(step, spec), {}
        raw[step_id] = Node(id=step_id, kind=kind, section=section, step=step, op=op, params=params,
                            inputs=op.inputs(step, loaded.dir), upstream={**op.upstream(step), **op.shown_upstream(step, spec)}, model=own, facts=facts)
    sorter = TopologicalSorter({sid: set(n.upstream.values()) for sid, n in raw.items()})
    try:
        order = list(sorter.static_order())
    except CycleError as exc:
        cycle = " -> ".join(f"`{s}`" for s in exc.args[1])
        raise PlanError(f"{loaded.path.name}: the steps form a cycle: {cycle}",
                        hint="a step cannot depend on its own output; check the `from:` fields") from None
    return {sid: raw[sid] for sid in order}


def _family_of(model: Any, loaded: Any, memo: dict[str, Any], where: tuple) -> Any:
    """The :class:`~caspec.families.base.Family` of ``model`` (read from configs; memoised per plan); a model
    that cannot be found is reported at its spec line."""
    from .. import families
    from ..models.load import model_family

    text = model.model_dump_json()
    if text not in memo:
        with model_error_at(loaded, where):
            memo[text] = families.get(model_family(model, loaded.dir))
    return memo[text]


@contextlib.contextmanager
def model_error_at(loaded: Any, where: tuple) -> Any:
    """A model that cannot be found or read becomes a spec error at the spec's ``model`` line (``where``)."""
    from ..errors import ModelError, SpecError

    try:
        yield
    except ModelError as exc:
        raise SpecError([loaded.problem((*where, "base") if where[-1] == "model" else where, exc.message,
                                        exc.hint)]) from None


def _check_scheduler(loaded: Any, section: str, step_id: str, params: dict[str, Any], family: Any) -> None:
    """A spec that names another family's sampler (``defaults.scheduler: ddim`` on FLUX.1) is an error."""
    from ..errors import SpecError

    named = loaded.spec.defaults.scheduler
    if named is not None and named != family.sampling_defaults["scheduler"]:
        raise SpecError([loaded.problem(("defaults", "scheduler"), f"`{named}` is not a sampler of the "
                                        f"{family.title} model that `{step_id}` runs",
                                        f"use `{family.sampling_defaults['scheduler']}`, or leave `scheduler` out")])


def make_plan(loaded: Any, store: Any, *, force: set[str] | frozenset[str] = frozenset(),
              model_identity: dict[str, Any] | None = None, environment_notes: bool = False,
              compute: Any = None) -> Plan:
    """Compile ``loaded`` (a LoadedSpec) against ``store`` (read-only). With ``environment_notes`` (what
    ``caspec plan`` and ``caspec status`` show), cached steps made under another environment get ``notes``;
    off by default, since asking the installed library versions costs a cached run measurable time.
    ``compute`` (a :class:`caspec.exec.compute.Compute`) is what the executor will run torch steps on;
    default: the local executor's."""
    nodes = build_nodes(loaded)
    if model_identity is None and any(n.op.USES_MODEL for n in nodes.values()):
        from ..models.load import model_identity as identify

        with model_error_at(loaded, ("model",)):
            model_identity = identify(loaded.spec.model, loaded.dir)
    own_identities: dict[str, Any] = {}
    for node in nodes.values():
        if node.model is not None and node.op.USES_MODEL:
            from ..models.load import model_identity as identify

            text = node.model.model_dump_json()
            if text not in own_identities:
                with model_error_at(loaded, (node.section, node.id, "model")):
                    own_identities[text] = identify(node.model, loaded.dir)
            node.model_identity = own_identities[text]
    if compute is None and any(n.op.TORCH_COMPUTE for n in nodes.values()):
        from ..exec.compute import local_compute

        compute = local_compute(loaded)
    previous = store.read_state(loaded.name).get("steps", {})
    digests: dict[Path, str] = {}
    records: dict[str, Any] = {}  # step id -> the record under its (possibly provisional) key, or None
    now = _Now(loaded)
    for node in nodes.values():
        node.input_digests = {role: _file_digest(p, digests) for role, p in node.inputs.items()}
        contents, node.pending = _upstream_contents(node, nodes, records)
        upstream = _cached_upstream(node, nodes, records) if node.op.IS_GATE else None
        rekey(node, loaded, contents, model_identity, upstream, compute)
        records[node.id] = store.get(node.key)
        _set_status(node, nodes, records[node.id], store, force, previous.get(node.id))
        if environment_notes and node.status == CACHED:
            _note_environment(node, records[node.id], now)
    return Plan(loaded=loaded, nodes=nodes, model_identity=model_identity, compute=compute)


def last_run_plan(loaded: Any, store: Any, plan: Plan) -> Plan | None:
    """``loaded``'s plan under the compute its last run on ``store`` recorded, where that differs from
    ``plan``'s (a Ray run keys CPU steps for 1 thread each); None otherwise. ``gc`` keeps, and ``assets``
    finds, what either plan names."""
    from ..exec.compute import recorded_compute

    last = recorded_compute(store, loaded)
    if last is None or last == plan.compute:
        return None
    return make_plan(loaded, store, model_identity=plan.model_identity, compute=last)


def rekey(node: Node, loaded: Any, upstream_contents: dict[str, str], model_identity: dict[str, Any] | None,
          upstream: dict[str, Any] | None = None, compute: Any = None) -> None:
    """(Re)compute a node's gate state, key material and key from the content digests of its upstream
    records (``keys.content_digest``, or a stand-in for one not yet run) and, for review gates, the
    upstream outputs when they exist, which resolves manifests pre-filled by candidate id."""
    inputs = dict(node.input_digests)
    if node.op.IS_GATE:
        node.gate = node.op.gate(node.step, node.id, loaded, upstream)
    if node.gate is not None:
        inputs["review"] = node.gate.material
    node.material = key_material(
        kind=node.kind, op_version=node.op.VERSION, params=node.params,
        model=(node.model_identity or model_identity) if node.op.USES_MODEL else None, inputs=inputs,
        upstream=upstream_contents,
        compute=compute.for_node(node) if compute is not None else None)
    node.key = cache_key(node.material)


def _upstream_contents(node: Node, nodes: dict[str, Node], records: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Role -> content digest of each upstream record, and the upstream steps that will run first.

    A step that will run contributes the content of its current record if it has one (what it
    consumes if the re-run writes the same bytes), else a stand-in derived from its key."""
    contents: dict[str, str] = {}
    pending: set[str] = set()
    for role, sid in node.upstream.items():
        record = records.get(sid)
        if nodes[sid].status != CACHED:
            pending.add(sid)
        contents[role] = content_digest(record) if record is not None else pending_content(nodes[sid].key)
    return contents, sorted(pending)


def _cached_upstream(node: Node, nodes: dict[str, Node], records: dict[str, Any]) -> dict[str, Any] | None:
    from ..ops.base import UpstreamView

    views = {}
    for role, sid in node.upstream.items():
        if nodes[sid].status != CACHED or (record := records.get(sid)) is None:
            return None
        views[role] = UpstreamView(record)
    return views


def _set_status(node: Node, nodes: dict[str, Node], record: Any, store: Any, force: set[str] | frozenset[str],
                prev: dict[str, Any] | None) -> None:
    waiting = [sid for sid in node.upstream.values() if nodes[sid].status in (AWAITING, BLOCKED)]
    if waiting:
        node.status = BLOCKED
        node.reasons = [f"waits for `{sid}` ({nodes[sid].status})" for sid in sorted(set(waiting))]
    elif node.gate is not None and not node.gate.decided:
        node.status = AWAITING
        node.reasons = [node.gate.reason]
    elif node.id in force:
        node.status, node.reasons = RUN, ["forced with --force"]
    elif node.pending:
        node.status, node.reasons = RUN, _why_after(node, record, store, prev)
    elif record is not None:
        node.status, node.reasons = CACHED, []
    else:
        node.status, node.reasons = RUN, _why_run(node, store, prev)
    for role, path in node.inputs.items():
        if not path.exists():
            node.reasons.append(f"input `{role}` not found: `{path}`")


def _previous_record(store: Any, prev: dict[str, Any] | None) -> Any:
    return store.get(prev["key"]) if prev and prev.get("key") else None


def _why_run(node: Node, store: Any, prev: dict[str, Any] | None) -> list[str]:
    if not prev:
        return ["never run"]
    old = _previous_record(store, prev)
    if old is None:
        return ["not in the store (first run here, or removed by gc)"]
    reasons = diff_material(old.material, node.material, node.upstream)
    return reasons or ["not in the store"]


STAYS = " (stays cached if its outputs are unchanged)"


def _why_after(node: Node, record: Any, store: Any, prev: dict[str, Any] | None) -> list[str]:
    """Reasons for a step that runs after upstream steps do: its own changes, then "after `x` runs"."""
    after = [f"after `{sid}` runs" for sid in node.pending]
    if record is not None:  # the key it gets if those outputs come out as they are now is in the store
        return [a + STAYS for a in after]
    old = _previous_record(store, prev)
    if old is None:
        return _why_run(node, store, prev) + after
    pending_roles = {role for role, sid in node.upstream.items() if sid in node.pending}
    before = old.material.get("upstream") or {}
    mine = {**node.material, "upstream": {role: before.get(role, value) if role in pending_roles else value
                                          for role, value in node.material["upstream"].items()}}
    own = diff_material(old.material, mine, node.upstream)
    return own + after if own else [a + STAYS for a in after]


class _Now:
    """The current environment, for comparing with cached records' (computed once, on first use)."""

    def __init__(self, loaded: Any):
        self.loaded = loaded
        self._env: dict[str, Any] | None = None

    def get(self, need_device: bool) -> dict[str, Any]:
        from ..environment import environment

        if self._env is None:
            self._env = environment(None)
        if need_device and self._env["device"] is None:
            from ..models.load import resolve_device

            self._env["device"] = resolve_device(self.loaded.spec.model)
        return self._env


def _note_environment(node: Node, record: Any, now: _Now) -> None:
    """Say where the environment that made a cached record differs from this one (never a re-run)."""
    from ..environment import describe, differences

    made = (record.meta or {}).get("environment") if record is not None else None
    if not isinstance(made, dict):
        return
    node.environment_changes = differences(made, now.get(need_device=made.get("device") is not None))
    text = describe(node.environment_changes)
    if text:
        node.notes = [text]
