"""Prompt validation in layers, returning every problem at once in ComfyUI's `node_errors` shape.

1. structure: each node has a registered class_type (else the top-level `invalid_prompt`);
2. outputs: output nodes, restricted to `partial_execution_targets`; none -> `prompt_no_outputs`;
3. per node, for the nodes the outputs need: links (shape, target node, slot, type), required inputs,
   widget values (pydantic: type, min, max), combos, custom `validate`;
4. cycles among the needed nodes (networkx).
An output runs when it and all its ancestors are valid; the others are reported in `node_errors`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .inputs import ComboSpec, types_match
from .node import NodeDef, _error
from .prompt import PromptNode, parse_node
from .registry import Registry


@dataclass
class ResolvedNode:
    """A prompt node bound to its NodeDef, with coerced constants."""

    id: str
    nodedef: NodeDef
    constants: dict[str, Any]
    links: dict[str, tuple[str, int]]
    title: str | None = None


@dataclass
class ValidationResult:
    error: dict | None
    node_errors: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    nodes: dict[str, ResolvedNode] = field(default_factory=dict)   # the needed, valid nodes
    order: list[str] = field(default_factory=list)                 # those nodes, topologically sorted

    @property
    def ok(self) -> bool:
        return self.error is None


def _top(kind: str, message: str, details: str = "", extra: dict | None = None) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


def validate_prompt(prompt: Any, registry: Registry,
                    partial_execution_targets: list[str] | None = None) -> ValidationResult:
    if prompt is None or prompt == {}:
        return ValidationResult(_top("no_prompt", "No prompt provided"))
    if not isinstance(prompt, dict):
        return ValidationResult(_top("invalid_prompt", "Prompt must be a JSON object of nodes",
                                     f"got {type(prompt).__name__}"))

    # Layer 1: structure and node types (every unknown node reported, the first one at the top level).
    parsed: dict[str, PromptNode] = {}
    node_errors: dict[str, dict] = {}
    first_bad: dict | None = None
    for node_id, raw in prompt.items():
        node_id = str(node_id)
        if not isinstance(raw, dict) or not isinstance(raw.get("class_type"), str):
            err = _top("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                       f"Node ID '#{node_id}'")
        elif raw["class_type"] not in registry:
            err = _top("invalid_prompt",
                       f"Cannot execute because node {raw['class_type']} does not exist.", f"Node ID '#{node_id}'")
        else:
            parsed[node_id] = parse_node(node_id, raw)
            continue
        first_bad = first_bad or err
        node_errors[node_id] = {"errors": [err], "dependent_outputs": [],
                                "class_type": raw.get("class_type") if isinstance(raw, dict) else None}
    if first_bad:
        return ValidationResult(first_bad, node_errors)

    # Layer 2: which outputs.
    outputs = [nid for nid, pn in parsed.items() if _known(registry, pn.class_type).output_node]
    if partial_execution_targets is not None:
        targets = {str(t) for t in partial_execution_targets}
        outputs = [nid for nid in outputs if nid in targets]
    if not outputs:
        return ValidationResult(_top("prompt_no_outputs", "Prompt has no outputs"))

    # The nodes the outputs need, and the link graph among them.
    needed: set[str] = set()
    edges: list[tuple[str, str]] = []
    stack = list(outputs)
    while stack:
        nid = stack.pop()
        if nid in needed:
            continue
        needed.add(nid)
        for src, _slot in parsed[nid].links.values():
            if src in parsed:
                edges.append((src, nid))
                if src not in needed:
                    stack.append(src)
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(nid for nid in parsed if nid in needed)   # prompt order keeps runs deterministic
    graph.add_edges_from(edges)

    # Layer 3: each needed node on its own.
    own_errors: dict[str, list[dict]] = {}
    resolved: dict[str, ResolvedNode] = {}
    for nid in needed:
        pn = parsed[nid]
        nd = _known(registry, pn.class_type)
        errors, constants = _check_node(pn, nd, parsed, registry)
        if errors:
            own_errors[nid] = errors
        resolved[nid] = ResolvedNode(nid, nd, constants, dict(pn.links), pn.title)

    # Layer 4: cycles (the strongly connected components are only computed when sorting fails).
    try:
        order = list(nx.topological_sort(graph))
        cyclic: list[set[str]] = []
    except nx.NetworkXUnfeasible:
        order = []
        cyclic = [c for c in nx.strongly_connected_components(graph)
                  if len(c) > 1 or any(graph.has_edge(n, n) for n in c)]
    for component in cyclic:
        members = sorted(component)
        for nid in members:
            own_errors.setdefault(nid, []).append(
                _top("dependency_cycle", "Dependency cycle detected",
                     f"nodes {', '.join(members)} depend on each other", {"cycle": members}))

    # Propagate: an output is valid when neither it nor any ancestor has errors. Each walk below is one
    # pass over the graph, whatever the number of bad nodes (a large graph may have many).
    bad_nodes = set(own_errors)
    tainted = _reach(graph.successors, bad_nodes)
    good_outputs = [o for o in outputs if o not in tainted]
    dependents = _dependent_outputs(graph, bad_nodes, [o for o in outputs if o in tainted])
    for nid, errors in own_errors.items():
        node_errors[nid] = {"errors": errors, "dependent_outputs": dependents.get(nid, []),
                            "class_type": parsed[nid].class_type}

    if not good_outputs:
        lines = []
        for entry in node_errors.values():
            for err in entry["errors"]:
                lines.append(f"{err['message']}: {err['details']}")
        return ValidationResult(_top("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                     "\n".join(lines)), node_errors)
    if tainted:
        keep = _reach(graph.predecessors, set(good_outputs))
        order = [n for n in (order or nx.topological_sort(graph.subgraph(keep))) if n in keep]
    return ValidationResult(None, node_errors, good_outputs, {nid: resolved[nid] for nid in order}, order)


def _reach(step, start: set[str]) -> set[str]:
    """`start` and everything reachable from it by `step` (successors or predecessors)."""
    seen = set(start)
    stack = list(start)
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _dependent_outputs(graph: nx.DiGraph, bad: set[str], outputs: list[str]) -> dict[str, list[str]]:
    """For each bad node, the (invalid) outputs that depend on it: one ancestor walk per affected output."""
    found: dict[str, list[str]] = {}
    for out in outputs:
        for nid in _reach(graph.predecessors, {out}) & bad:
            found.setdefault(nid, []).append(out)
    return found


def _known(registry: Registry, class_type: str) -> NodeDef:
    nd = registry.get(class_type)
    assert nd is not None  # layer 1 turned away prompts with unknown class types
    return nd


def _check_node(pn: PromptNode, nd: NodeDef, parsed: dict[str, PromptNode],
                registry: Registry) -> tuple[list[dict], dict]:
    errors: list[dict] = []
    for name, value in pn.bad_links.items():
        errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [string, integer]",
                             f"{name}, {value!r}", name, value))
    for name, (src, slot) in pn.links.items():
        decl = nd.inputs.get(name)
        source = parsed.get(src)
        if source is None:
            errors.append(_error("bad_linked_input", "Linked node does not exist",
                                 f"{name}: node '{src}' is not in the prompt", name, [src, slot]))
            continue
        outs = _known(registry, source.class_type).outputs
        if not 0 <= slot < len(outs):
            errors.append(_error("bad_linked_input", "Linked output slot does not exist",
                                 f"{name}: node '{src}' ({source.class_type}) has {len(outs)} outputs, not slot {slot}",
                                 name, [src, slot]))
            continue
        if decl is None or decl.section == "hidden":
            continue
        expected = decl.spec.wire
        received = outs[slot].wire
        if isinstance(decl.spec, ComboSpec):
            expected = "COMBO"
            ok = received in ("COMBO", "*", "STRING", "INT", "FLOAT") or types_match(received, "COMBO")
        else:
            ok = types_match(received, expected)
        if not ok:
            errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                 f"{name}, received_type({received}) mismatch input_type({expected})",
                                 name, [src, slot], received_type=received, input_type=expected))
    for decl in nd.inputs.values():
        if (decl.section == "required" and decl.name not in pn.links and decl.name not in pn.constants
                and decl.name not in pn.bad_links):   # a malformed link is reported once, as bad_linked_input
            errors.append(_error("required_input_missing", "Required input is missing", decl.name, decl.name, None))
    constants = {k: v for k, v in pn.constants.items() if k in nd.inputs or nd.accepts_extra}
    for name, value in list(constants.items()):
        decl = nd.inputs.get(name)
        if decl is not None and not decl.spec.is_widget and decl.section != "hidden" and value is not None:
            errors.append(_error("invalid_input_type",
                                 f"Input {name} takes a link of type {decl.spec.wire}, not a value",
                                 f"{name}, {value!r}", name, value))
            constants.pop(name)
    coerced, value_errors = nd.check_values(constants)
    errors.extend(value_errors)
    if nd.validate is not None and not value_errors:
        names = nd.validate_names
        args = coerced if "*" in names else {k: coerced.get(k) for k in names if k in nd.inputs}
        try:
            verdict = nd.validate(**args)
        except Exception as exc:
            verdict = f"{type(exc).__name__}: {exc}"
        if verdict is not True:
            errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                           "details": f"{', '.join(sorted(args))} - {verdict}",
                           "extra_info": {"input_name": next(iter(args), None)}})
    return errors, coerced
