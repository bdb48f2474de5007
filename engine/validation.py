"""Prompt validation in layers, returning every problem at once in ComfyUI's `node_errors` shape.

1. structure: each node has a registered class_type (else the top-level `invalid_prompt`);
2. outputs: output nodes, restricted to `partial_execution_targets`; none -> `prompt_no_outputs`;
3. per node, for the nodes the outputs need: links (shape, target node, slot, type), required inputs,
   widget values (pydantic: type, min, max), combos, custom `validate`;
4. cycles among the needed nodes (networkx).
An output runs when it and all its ancestors are valid; the others are reported in `node_errors`.

The layers do not stop each other: an unknown class is reported together with the type mismatches and
range errors of the other nodes, so one response lists everything to fix. What is reported is bounded
(a hostile prompt can be one 20,000-node cycle): a cycle is one error on a few of its members with the
member list capped, each node keeps at most MAX_ERRORS_PER_NODE errors, at most MAX_NODE_ERRORS nodes are
listed, and every text is cut at MAX_TEXT characters.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .cost import check_costs, work_budget
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


MAX_NODE_ERRORS = 100          # nodes listed in node_errors
MAX_ERRORS_PER_NODE = 20
MAX_CYCLE_MEMBERS = 20         # members named in a cycle error
MAX_CYCLE_REPORTS = 5          # members of one cycle that carry its error
MAX_SUMMARY_LINES = 50
MAX_TEXT = 500
MAX_SUGGESTED = 20             # unknown names that get "did you mean" (each costs a fuzzy search)


def _top(kind: str, message: str, details: str = "", extra: dict | None = None, limit: int = MAX_TEXT) -> dict:
    return {"type": kind, "message": message, "details": _cut(details, limit), "extra_info": extra or {}}


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def suggest(name: Any, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for a close match among `choices`, else ''."""
    if not isinstance(name, str) or not name or len(name) > 200:
        return ""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[name.lower()]] if name.lower() in lowered else []
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return _cut(text, 80)


def validate_prompt(prompt: Any, registry: Registry, partial_execution_targets: list[str] | None = None,
                    *, budget_bytes: int | None = None) -> ValidationResult:
    """`budget_bytes`: the memory one node may need (default: `engine.cost.work_budget` of the registry's
    config); nodes whose cost estimate exceeds it are refused."""
    if prompt is None or prompt == {}:
        return ValidationResult(_top("no_prompt", "No prompt provided"))
    if not isinstance(prompt, dict):
        return ValidationResult(_top("invalid_prompt", "Prompt must be a JSON object of nodes",
                                     f"got {type(prompt).__name__}"))

    # Layer 1: structure and node types. Unknown nodes are reported and the other layers still run, so
    # one answer lists every problem; the prompt is refused as ComfyUI does (first unknown at the top).
    parsed: dict[str, PromptNode] = {}
    unknown: dict[str, dict] = {}           # node id -> raw (for its links)
    node_errors: dict[str, dict] = {}
    first_bad: dict | None = None
    suggested = 0
    for node_id, raw in prompt.items():
        node_id = str(node_id)
        if not isinstance(raw, dict) or not isinstance(raw.get("class_type"), str):
            err = _top("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                       f"Node ID '#{_short(node_id)}'")
        elif raw["class_type"] not in registry:
            hint = ""
            if suggested < MAX_SUGGESTED:
                suggested += 1
                hint = suggest(raw["class_type"], registry.names())
            err = _top("invalid_prompt",
                       _cut(f"Cannot execute because node {raw['class_type']} does not exist.{hint}"),
                       f"Node ID '#{_short(node_id)}'")
        else:
            parsed[node_id] = parse_node(node_id, raw)
            continue
        first_bad = first_bad or err
        unknown[node_id] = raw
        if len(node_errors) < MAX_NODE_ERRORS:
            class_type = raw.get("class_type") if isinstance(raw, dict) else None
            node_errors[node_id] = {"errors": [err], "dependent_outputs": [],
                                    "class_type": class_type if isinstance(class_type, str) else None}

    # Layer 2: which outputs.
    outputs = [nid for nid, pn in parsed.items() if _known(registry, pn.class_type).output_node]
    if partial_execution_targets is not None:
        targets = {str(t) for t in partial_execution_targets}
        outputs = [nid for nid in outputs if nid in targets]
    if not outputs:
        return ValidationResult(first_bad or _top("prompt_no_outputs", "Prompt has no outputs"), node_errors)

    # The nodes the outputs need, and the link graph among them.
    needed: set[str] = set()
    edges: list[tuple[str, str]] = []
    stack = list(outputs)
    while stack:
        nid = stack.pop()
        if nid in needed:
            continue
        needed.add(nid)
        if nid in unknown:
            continue                 # its links cannot be read without its class
        for src, _slot in parsed[nid].links.values():
            if src in parsed or src in unknown:
                edges.append((src, nid))
                if src not in needed:
                    stack.append(src)
    graph: nx.DiGraph[str] = nx.DiGraph()
    # prompt order keeps runs deterministic
    graph.add_nodes_from(nid for nid in prompt_ids(prompt) if nid in needed)
    graph.add_edges_from(edges)

    # Layer 3: each needed node on its own.
    own_errors: dict[str, list[dict]] = {}
    resolved: dict[str, ResolvedNode] = {}
    for nid in needed:
        if nid in unknown:
            own_errors[nid] = node_errors[nid]["errors"] if nid in node_errors else []
            continue
        pn = parsed[nid]
        nd = registry.get(pn.class_type)
        assert nd is not None  # unknown class types were set aside in layer 1
        errors, constants = _check_node(pn, nd, parsed, registry, unknown)
        if errors:
            if len(errors) > MAX_ERRORS_PER_NODE:
                more = len(errors) - MAX_ERRORS_PER_NODE + 1
                errors = errors[:MAX_ERRORS_PER_NODE - 1] + [_top(
                    "too_many_errors", f"{more} more problems on this node are not listed", "")]
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
    cycle_members: set[str] = set()
    for component in cyclic:
        # One error per cycle, carried by its first few members (each member is blamed, so the editor can
        # mark them, but a huge cycle must not cost members x members).
        members = sorted(component)
        shown = members[:MAX_CYCLE_MEMBERS]
        text = ", ".join(shown) + (f" and {len(members) - len(shown)} more" if len(members) > len(shown) else "")
        err = _top("dependency_cycle", "Dependency cycle detected", f"nodes {text} depend on each other",
                   {"cycle": shown, "cycle_size": len(members)})
        for nid in members[:MAX_CYCLE_REPORTS]:
            own_errors.setdefault(nid, []).append(err)
        cycle_members.update(members)

    # Layer 5: the memory estimate, over the valid nodes in order (sizes flow from sources to consumers).
    if order and any(rn.nodedef.cost is not None for rn in resolved.values()):
        budget = budget_bytes if budget_bytes is not None else work_budget(getattr(registry, "config", None))
        for nid, err in check_costs(resolved, order, budget, skip=set(own_errors) | set(unknown)).items():
            own_errors.setdefault(nid, []).append(err)

    # Propagate: an output is valid when neither it nor any ancestor has errors. Each walk below is one
    # pass over the graph, whatever the number of bad nodes (a large graph may have many).
    bad_nodes = set(own_errors) | cycle_members
    tainted = _reach(graph.successors, bad_nodes)
    good_outputs = [o for o in outputs if o not in tainted]
    dependents = _dependent_outputs(graph, set(own_errors), [o for o in outputs if o in tainted])
    omitted = max(len(unknown) - len(node_errors), 0)
    for nid, errors in own_errors.items():
        if nid in unknown:
            if nid in node_errors:
                node_errors[nid]["dependent_outputs"] = dependents.get(nid, [])
            continue
        if len(node_errors) >= MAX_NODE_ERRORS:
            omitted += 1
            continue
        node_errors[nid] = {"errors": errors, "dependent_outputs": dependents.get(nid, []),
                            "class_type": parsed[nid].class_type}

    if first_bad is not None:
        if omitted:
            first_bad = {**first_bad, "extra_info": {**first_bad["extra_info"], "omitted_nodes": omitted}}
        return ValidationResult(first_bad, node_errors)
    if not good_outputs:
        lines: list[str] = []
        seen: set[int] = set()
        total = 0
        for entry in node_errors.values():
            for err in entry["errors"]:
                if id(err) in seen:        # a cycle's one error, carried by several members
                    continue
                seen.add(id(err))
                total += 1
                if len(lines) < MAX_SUMMARY_LINES:
                    lines.append(f"{err['message']}: {err['details']}")
        if total > len(lines):
            lines.append(f"… and {total - len(lines)} more")
        if omitted:
            lines.append(f"… and {omitted} more nodes with errors are not listed")
        return ValidationResult(_top("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                     "\n".join(lines), {"omitted_nodes": omitted} if omitted else None,
                                     limit=MAX_TEXT * MAX_SUMMARY_LINES), node_errors)
    if tainted:
        keep = _reach(graph.predecessors, set(good_outputs))
        order = [n for n in (order or nx.topological_sort(graph.subgraph(keep))) if n in keep]
    return ValidationResult(None, node_errors, good_outputs, {nid: resolved[nid] for nid in order}, order)


def prompt_ids(prompt: dict) -> list[str]:
    return [str(k) for k in prompt]


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
                registry: Registry, unknown: dict | frozenset = frozenset()) -> tuple[list[dict], dict]:
    errors: list[dict] = []
    for name, value in pn.bad_links.items():
        if len(errors) > MAX_ERRORS_PER_NODE:
            break
        errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [string, integer]",
                             f"{_short(name)}, {_short(value)}", name, value))
    for name, (src, slot) in pn.links.items():
        if len(errors) > MAX_ERRORS_PER_NODE:
            break
        decl = nd.inputs.get(name)
        if src in unknown:
            continue                 # that node is reported on its own; its outputs are unknown
        source = parsed.get(src)
        if source is None:
            errors.append(_error("bad_linked_input", "Linked node does not exist",
                                 f"{_short(name)}: node '{_short(src)}' is not in the prompt", name, [src, slot]))
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
    given_unknown: list[str] | None = None
    for decl in nd.inputs.values():
        if decl.section != "required" or decl.name in pn.links or decl.name in pn.bad_links:
            continue                 # a malformed link is reported once, as bad_linked_input
        if decl.name in pn.constants and pn.constants[decl.name] is not None:
            continue
        if decl.name in pn.constants:   # `null`: JSON's way of leaving it out, which a required input cannot be
            errors.append(_error("required_input_missing", "Required input is missing",
                                 f"{decl.name}: null is not a value; give a value or a link", decl.name, None))
            continue
        if given_unknown is None:       # names the prompt gives that the node does not have (typos)
            given_unknown = [k for k in (*pn.constants, *pn.links) if k not in nd.inputs][:MAX_SUGGESTED]
        close = difflib.get_close_matches(decl.name, given_unknown, n=1, cutoff=0.6) if given_unknown else []
        hint = f" (the prompt gives {_short(close[0])!r}: did you mean {decl.name}?)" if close else ""
        errors.append(_error("required_input_missing", "Required input is missing", decl.name + hint,
                             decl.name, None))
    constants = {k: v for k, v in pn.constants.items()
                 if (k in nd.inputs or nd.accepts_extra)
                 and not (v is None and k in nd.inputs and nd.inputs[k].section == "required")}
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
                           "details": _cut(f"{', '.join(sorted(args))} - {verdict}"),
                           "extra_info": {"input_name": next(iter(args), None)}})
    return errors, coerced
