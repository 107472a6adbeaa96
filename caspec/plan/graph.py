"""PLAN: compile a loaded spec into a DAG of steps with cache keys. Pure: reads, never writes.

``make_plan(loaded, store)`` resolves each step's op parameters, hashes its input files, reads review
decisions, derives keys in dependency order, and asks the store (read-only) what is cached.
Statuses: ``cached``, ``run``, ``awaiting-review`` (a gate without a decision), ``blocked``
(something upstream waits for review). Each status carries human reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..ops import get_op
from ..ops.base import GateState, Op
from ..spec.models import kind_of
from .keys import cache_key, diff_material, key_material

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

    @property
    def short_key(self) -> str:
        return self.key[:12]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "key": self.key, "status": self.status,
                "reasons": self.reasons, "upstream": sorted(set(self.upstream.values()))}


@dataclass
class Plan:
    loaded: Any
    nodes: dict[str, Node]  # in topological order
    model_identity: dict[str, Any] | None

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
    for section, step_id, step in spec.steps():
        kind = kind_of(section, step)
        op = get_op(kind)
        raw[step_id] = Node(id=step_id, kind=kind, section=section, step=step, op=op,
                            params=op.params(step, spec), inputs=op.inputs(step, loaded.dir),
                            upstream=op.upstream(step))
    sorter = TopologicalSorter({sid: set(n.upstream.values()) for sid, n in raw.items()})
    try:
        order = list(sorter.static_order())
    except CycleError as exc:
        cycle = " -> ".join(f"`{s}`" for s in exc.args[1])
        raise PlanError(f"{loaded.path.name}: the steps form a cycle: {cycle}",
                        hint="a step cannot depend on its own output; check the `from:` fields") from None
    return {sid: raw[sid] for sid in order}


def make_plan(loaded: Any, store: Any, *, force: set[str] | frozenset[str] = frozenset(),
              model_identity: dict[str, Any] | None = None) -> Plan:
    """Compile ``loaded`` (a LoadedSpec) against ``store`` (read-only)."""
    nodes = build_nodes(loaded)
    if model_identity is None and any(n.op.USES_MODEL for n in nodes.values()):
        from ..models.load import model_identity as identify

        model_identity = identify(loaded.spec.model, loaded.dir)
    previous = store.read_state(loaded.name).get("steps", {})
    digests: dict[Path, str] = {}
    for node in nodes.values():
        node.input_digests = {role: _file_digest(p, digests) for role, p in node.inputs.items()}
        upstream = _cached_upstream(node, nodes, store) if node.op.IS_GATE else None
        rekey(node, loaded, {role: nodes[sid].key for role, sid in node.upstream.items()}, model_identity, upstream)
        _set_status(node, nodes, store, force, previous.get(node.id))
    return Plan(loaded=loaded, nodes=nodes, model_identity=model_identity)


def rekey(node: Node, loaded: Any, upstream_keys: dict[str, str], model_identity: dict[str, Any] | None,
          upstream: dict[str, Any] | None = None) -> None:
    """(Re)compute a node's gate state, key material and key from its upstream keys (and, for review
    gates, the upstream outputs when they exist, which resolves manifests pre-filled by candidate id)."""
    inputs = dict(node.input_digests)
    if node.op.IS_GATE:
        node.gate = node.op.gate(node.step, node.id, loaded, upstream)
    if node.gate is not None:
        inputs["review"] = node.gate.material
    node.material = key_material(
        kind=node.kind, op_version=node.op.VERSION, params=node.params,
        model=model_identity if node.op.USES_MODEL else None, inputs=inputs, upstream=upstream_keys)
    node.key = cache_key(node.material)


def _cached_upstream(node: Node, nodes: dict[str, Node], store: Any) -> dict[str, Any] | None:
    from ..ops.base import UpstreamView

    views = {}
    for role, sid in node.upstream.items():
        if nodes[sid].status != CACHED or (record := store.get(nodes[sid].key)) is None:
            return None
        views[role] = UpstreamView(record)
    return views


def _set_status(node: Node, nodes: dict[str, Node], store: Any, force: set[str] | frozenset[str],
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
    elif store.has(node.key):
        node.status, node.reasons = CACHED, []
    else:
        node.status, node.reasons = RUN, _why_run(node, store, prev)
    for role, path in node.inputs.items():
        if not path.exists():
            node.reasons.append(f"input `{role}` not found: `{path}`")


def _why_run(node: Node, store: Any, prev: dict[str, Any] | None) -> list[str]:
    if not prev:
        return ["never run"]
    old = store.get(prev["key"]) if prev.get("key") else None
    if old is None:
        return ["not in the store (first run here, or removed by gc)"]
    reasons = diff_material(old.material, node.material, node.upstream)
    return reasons or ["not in the store"]
