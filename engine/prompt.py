"""The API-format prompt ("workflow to run"): `{node_id: {"class_type", "inputs", "_meta"?}}`.

Parsing follows ComfyUI exactly: a link is a list of exactly two items whose first is a str and second an
int (or integral float); `{"__value__": [...]}` wraps a literal list; every other value is a constant.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


def unwrap(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1 and "__value__" in value:
        return value["__value__"]
    return value


@dataclass
class PromptNode:
    id: str
    class_type: str
    constants: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)
    bad_links: dict[str, Any] = field(default_factory=dict)   # list values of the wrong shape
    title: str | None = None


def parse_node(node_id: str, raw: dict) -> PromptNode:
    inputs = raw.get("inputs") or {}
    meta = raw.get("_meta")
    if not isinstance(meta, dict):
        meta = {}
    pn = PromptNode(node_id, raw["class_type"], title=meta.get("title"))
    if not isinstance(inputs, dict):
        pn.bad_links["inputs"] = inputs
        return pn
    for name, value in inputs.items():
        if is_link(value):
            pn.links[name] = (value[0], int(value[1]))
        elif isinstance(value, list):
            pn.bad_links[name] = value
        else:
            pn.constants[name] = unwrap(value)
    return pn


def apply_overrides(prompt: dict, overrides: dict[str, Any], registry: Any = None) -> dict:
    """Set inputs by `"NODE.INPUT": value`, where NODE is a node id, a node title (`_meta.title`) or a
    node type that occurs once, so a saved workflow runs headless with only its inputs given. Returns a
    new prompt; raises ValueError naming the override that does not fit. With a `registry`, an INPUT
    the node's type does not declare is refused with the closest names (a typo would otherwise be a
    silently ignored extra input and the run would go ahead with the old value)."""
    out = {nid: {**node, "inputs": dict(node.get("inputs") or {})} if isinstance(node, dict) else node
           for nid, node in prompt.items()}
    for target, value in overrides.items():
        node_ref, dot, input_name = str(target).rpartition(".")
        if not dot or not node_ref or not input_name:
            raise ValueError(f"override {target!r}: expected NODE.INPUT (a node id, title or type, then an input)")
        nid = node_ref if node_ref in out else _find_node(out, node_ref, target)
        if not isinstance(out[nid], dict):
            raise ValueError(f"override {target!r}: node {nid} is not a node object")
        if registry is not None:
            _check_input_name(registry, out[nid], nid, input_name, target)
        out[nid]["inputs"][input_name] = value
    return out


def _check_input_name(registry: Any, node: dict, nid: str, input_name: str, target: str) -> None:
    nd = registry.get(node.get("class_type"))
    if nd is None or nd.accepts_extra or input_name in nd.inputs:
        return                       # an unknown class is reported by validation
    names = [n for n, d in nd.inputs.items() if d.section != "hidden"]
    close = difflib.get_close_matches(input_name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; its inputs are {', '.join(names)}"
    raise ValueError(f"override {target!r}: node {nid} ({nd.name}) has no input {input_name!r}{hint}")


def _find_node(prompt: dict, ref: str, target: str) -> str:
    """The node a title names, else the only node of that type."""
    nodes = {nid: n for nid, n in prompt.items() if isinstance(n, dict)}
    by_title = [nid for nid, n in nodes.items() if (n.get("_meta") or {}).get("title") == ref]
    by_type = [nid for nid, n in nodes.items() if n.get("class_type") == ref]
    for found, label in ((by_title, "titled"), (by_type, "of type")):
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"override {target!r}: nodes {', '.join(found)} are all {label} {ref!r}; use a node id")
    raise ValueError(f"override {target!r}: no node with id, title or type {ref!r}")
