"""The spec's JSON Schema, for editors (YAML language servers) and other tools.

The schema is generated from the pydantic models and committed as ``caspec/spec/spec.schema.json``;
a test checks that the committed file is current. Regenerate it with ``python -m caspec.spec.schema``.

The generated schema is widened where the models accept more than their field types say
(before-validators): ``model`` also takes a plain string, ``edits.*.prompts`` a single string and
``edits.*.pick`` a single index. It describes the spec as written before templating, so a field
such as ``seed: "{{ seed }}"`` that only becomes a number once rendered is still flagged.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .models import Spec

SCHEMA_PATH = Path(__file__).with_name("spec.schema.json")
"""Where the committed schema lives."""

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (draft 2020-12) as a dict."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = DRAFT
    _widen_model(schema["properties"])
    _widen_edit(schema["$defs"]["EditStep"]["properties"])
    _close_step_maps(schema)
    return schema


def _widen_model(props: dict[str, Any]) -> None:
    ref = props["model"]
    props["model"] = {
        "anyOf": [{"type": "string", "minLength": 1}, {k: v for k, v in ref.items() if k == "$ref"}],
        "description": ("The diffusion model: `tiny`, a local diffusers folder or a hub id, "
                        "or a mapping with `base`, `revision`, `dtype`, `device`."),
    }


def _widen_edit(props: dict[str, Any]) -> None:
    prompts = props["prompts"]
    array = {k: v for k, v in prompts.items() if k not in ("description", "title")}
    props["prompts"] = {
        "anyOf": [copy.deepcopy(array["items"]), array],
        "description": prompts.get("description", ""),
        "title": prompts.get("title", "Prompts"),
    }
    pick = props["pick"]
    items = next((a["items"] for a in pick.get("anyOf", []) if a.get("type") == "array"), None)
    if items is not None:
        pick["anyOf"].insert(0, copy.deepcopy(items))


def _close_step_maps(node: Any) -> None:
    """Step-id maps (``patternProperties``) admit no other keys, as the models do."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_step_maps(value)
    elif isinstance(node, list):
        for value in node:
            _close_step_maps(value)


def schema_text() -> str:
    """The schema as committed: pretty JSON, sorted keys, trailing newline."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    """Write the schema to ``path`` (default: the committed file) and return the path."""
    path = Path(path)
    path.write_text(schema_text(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_schema())
