"""Legacy group nodes (`workflow>NAME` / `workflow/NAME`, defined in `extra.groupNodes`), as subgraphs.

The 2023-2024 frontend saved a group node as a definition (the inner nodes in execution order, the links
between them as `[origin index, origin slot, target index, target slot, origin id, type]`, and `external`:
the inner outputs that leave the group) plus instances whose sockets and widgets the frontend derived
from the inner nodes' schemas. At queue time the frontend replaced an instance by its inner nodes, with
ids `"<instance id>:<inner index>"`.

This module rebuilds, for one instance, what the frontend derived: which instance input feeds which inner
slot, which inner output each instance output is, and which inner widget each instance widget value
belongs to. It returns a subgraph definition (the shape `definitions.subgraphs` uses) whose inner nodes
carry the instance's widget values, so the converter flattens it like any subgraph.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

GROUP_PREFIXES = ("workflow>", "workflow/")
_INPUT_NODE, _OUTPUT_NODE = -10, -20


def group_name(ntype: str) -> str | None:
    """The `extra.groupNodes` key a node type refers to, or None for any other type."""
    for prefix in GROUP_PREFIXES:
        if ntype.startswith(prefix):
            return ntype[len(prefix):]
    return None


@dataclass
class _Derived:
    """What the frontend's group-node registration derives from a definition."""

    socket_inputs: list[tuple[str, int, int]] = field(default_factory=list)   # name, inner index, inner slot
    widgets: list[tuple[str, int, str, str]] = field(default_factory=list)    # name, inner index, input, kind
    converted: list[tuple[str, int, int, str]] = field(default_factory=list)  # name, inner idx, slot, input
    outputs: list[tuple[int, int]] = field(default_factory=list)              # inner index, inner slot


class GroupNodeError(ValueError):
    pass


def _inner_def(node: dict, index: int, info: dict, links_from: dict, links_to: dict, external: dict,
               schema_inputs, node_at) -> tuple[list[tuple[str, Any, dict]], list[str]] | None:
    """(inputs as (name, type, options) in declared order, output types) of an inner node, or None when
    the frontend skips the node (an unlinked primitive, a reroute used only inside the group)."""
    ntype = node.get("type")
    class_info = info.get(ntype)
    if class_info:
        inputs = [(s.name, s.type, s.options) for s in schema_inputs(class_info)]
        outputs = [("COMBO" if isinstance(t, list) else str(t)) for t in class_info.get("output") or []]
        return inputs, outputs
    if ntype == "PrimitiveNode":
        if not links_from.get(index):
            return None
        first = links_from[index][0][0]
        typ = first[5] if len(first) > 5 else "*"
        if typ == "COMBO":  # a combo primitive takes the target widget's choices
            target = node_at(first[2])
            widget_name = ((node.get("outputs") or [{}])[0].get("widget") or {}).get("name")
            target_info = info.get((target or {}).get("type")) or {}
            for name, ttype, _ in ([(s.name, s.type, s.options) for s in schema_inputs(target_info)]
                                   if target_info else []):
                if name == widget_name:
                    typ = ttype
        return [("value", typ, {})], ["COMBO" if isinstance(typ, list) else str(typ)]
    if ntype == "Reroute":
        if links_to.get(index) and links_from.get(index) and not external.get(index, {}).get(0):
            return None
        typ = "*"
        for link in (links_from.get(index) or {}).get(0, []):
            target = node_at(link[2])
            slots = (target or {}).get("inputs") or []
            if link[3] < len(slots) and typ == "*":
                typ = slots[link[3]].get("type") or "*"
        if typ == "*" and (links_to.get(index) or {}).get(0):
            link = links_to[index][0]
            source = node_at(link[0])
            outs = (source or {}).get("outputs") or []
            if link[1] < len(outs):
                typ = outs[link[1]].get("type") or "*"
        if typ == "*":
            typ = external.get(index, {}).get(0) or "*"
        return [(str(typ), str(typ), {"forceInput": True})], [str(typ)]
    # A type the schema does not know: its saved sockets are all that can be known; validation will
    # report the class by name.
    inputs = [(s.get("name"), s.get("type"), {}) for s in node.get("inputs") or []
              if isinstance(s.get("name"), str) and not s.get("widget")]
    outputs = [str(s.get("type")) for s in node.get("outputs") or []]
    return inputs, outputs


def build_definition(instance: dict, definition: dict, info: dict, **helpers: Any) -> dict:
    """A subgraph definition equivalent to one group node instance (see the module docstring).

    `helpers` are the converter's callables (schema reading and widget layouts live there). A
    definition too damaged to read is a GroupNodeError naming the group.
    """
    name = group_name(instance["type"]) or instance["type"]
    try:
        return _build(instance, definition, info, name, **helpers)
    except GroupNodeError:
        raise
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise GroupNodeError(f"group node {name!r}: malformed definition ({type(exc).__name__}: {exc})") from None


def _build(instance: dict, definition: dict, info: dict, name: str, *, widget_kinds, schema_inputs,
           widget_values, is_widget_type) -> dict:
    raw_nodes = definition.get("nodes")
    if not isinstance(raw_nodes, list) or not all(isinstance(n, dict) and isinstance(n.get("type"), str)
                                                  for n in raw_nodes):
        raise GroupNodeError(f"group node {name!r}: 'nodes' must be a list of nodes with a 'type'")
    for n in raw_nodes:
        for slot_list in ("inputs", "outputs"):
            if not isinstance(n.get(slot_list) or [], list) or not all(isinstance(x, dict)
                                                                       for x in n.get(slot_list) or []):
                raise GroupNodeError(f"group node {name!r}: inner node {n['type']!r}: '{slot_list}' "
                                     "must be a list of slots")
    nodes = [copy.deepcopy(n) for n in raw_nodes]
    node_at = lambda i: nodes[i] if isinstance(i, int) and 0 <= i < len(nodes) else None  # noqa: E731

    links_from: dict[int, dict[int, list]] = {}
    links_to: dict[int, dict[int, list]] = {}
    for link in definition.get("links") or []:
        if not isinstance(link, list) or len(link) < 4:
            raise GroupNodeError(f"group node {name!r}: malformed link {link!r}")
        if link[0] is None:
            continue  # a link from outside the copied nodes
        try:
            src, sslot, tgt, tslot = (int(v) for v in link[:4])
        except (TypeError, ValueError):
            raise GroupNodeError(f"group node {name!r}: malformed link {link!r}") from None
        link = [src, sslot, tgt, tslot, *link[4:]]
        links_from.setdefault(src, {}).setdefault(sslot, []).append(link)
        links_to.setdefault(tgt, {})[tslot] = link
    external: dict[int, dict[int, Any]] = {}
    for ext in definition.get("external") or []:
        if isinstance(ext, list) and len(ext) >= 3:
            external.setdefault(int(ext[0]), {})[int(ext[1])] = ext[2]
    config: dict = definition["config"] if isinstance(definition.get("config"), dict) else {}

    derived = _Derived()
    seen: dict[str, int] = {}
    deferred: list = []

    def input_name(node: dict, index: int, input_name_: str) -> tuple[str, dict]:
        custom = ((config.get(str(index)) or {}).get("input") or {}).get(input_name_) or {}
        label = next((s.get("label") for s in node.get("inputs") or []
                      if s.get("name") == input_name_ and s.get("label")), None)
        shown = custom.get("name") or label or input_name_
        key = shown
        if (node.get("type") == "PrimitiveNode" and node.get("title")) or shown in seen:
            prefix = f"{node.get('title') or node.get('type')} "
            key = shown = f"{prefix}{input_name_}"
            if shown in seen:
                shown = f"{prefix}{seen[shown]} {input_name_}"
        seen[key] = seen.get(key, 1) + 1
        return shown, custom

    for index, node in enumerate(nodes):
        found = _inner_def(node, index, info, links_from, links_to, external, schema_inputs, node_at)
        if found is None:
            continue
        inputs, outputs = found
        to_me = links_to.get(index, {})
        socket_slots: list[tuple[str, Any, dict]] = []
        converted_at: dict[int, str] = {}
        widget_names: dict[str, str] = {}
        for iname, itype, opts in inputs:
            if is_widget_type(itype) and not opts.get("forceInput"):
                pos = next((k for k, s in enumerate(node.get("inputs") or [])
                            if s.get("name") == iname and (s.get("widget") or {}).get("name") == iname), -1)
                if pos > -1:
                    converted_at[pos] = iname
                else:
                    shown, _ = input_name(node, index, iname)
                    widget_names[iname] = shown
            else:
                socket_slots.append((iname, itype, opts))
        for kind_name, kind in widget_kinds(node, index, info, inputs, links_from):
            if kind_name in widget_names:
                derived.widgets.append((widget_names[kind_name], index, kind_name, kind))
        for i, (iname, _, _) in enumerate(socket_slots):
            if i in to_me:
                continue
            shown, custom = input_name(node, index, iname)
            if custom.get("visible") is False:
                continue
            derived.socket_inputs.append((shown, index, i))

        def later(node=node, index=index, slots=socket_slots, converted=converted_at, to_me=to_me):
            for j, iname in enumerate(converted[k] for k in sorted(converted, key=str)):
                if len(slots) + j in to_me:
                    continue
                shown, _ = input_name(node, index, iname)
                derived.converted.append((shown, index, len(slots) + j, iname))
                derived.widgets.append((shown, index, iname, "value"))
                if iname in ("seed", "noise_seed"):
                    derived.widgets.append((shown, index, iname, "control"))
        deferred.append(later)

        mine_from = links_from.get(index, {})
        for slot in range(len(outputs)):
            if mine_from.get(slot) and not external.get(index, {}).get(slot):
                continue
            derived.outputs.append((index, slot))
    for run in deferred:
        run()

    # ---- instance widget values -> inner widgets
    values = instance.get("widgets_values")
    by_name: dict[tuple[int, str], Any] = {}
    if isinstance(values, list):
        layout = derived.widgets
        if len(values) != len(layout):
            # some frontends never stored the seed's control or a combo's filter slot
            for drop in ({"filter"}, {"filter", "control"}):
                trimmed = [w for w in derived.widgets if w[3] not in drop]
                if len(trimmed) == len(values):
                    layout = trimmed
                    break
        if len(layout) == len(values):
            for (_, index, iname, kind), value in zip(layout, values):
                if kind == "value":
                    by_name[(index, iname)] = value
        # with no layout fitting, the inner nodes keep their own saved values (what the frontend shows
        # when it creates an instance from the definition)

    # ---- the equivalent subgraph
    out_nodes: list[dict] = []
    sub_links: list[dict] = []

    def add_link(origin: int, oslot: int, target: int, tslot: int, ltype: Any) -> int:
        lid = len(sub_links) + 1
        sub_links.append({"id": lid, "origin_id": origin, "origin_slot": oslot, "target_id": target,
                          "target_slot": tslot, "type": ltype})
        return lid

    for index, node in enumerate(nodes):
        node["id"] = index
        slots = [dict(s) for s in node.get("inputs") or []]
        for s in slots:
            s["link"] = None
        node["inputs"] = slots
        mine = {iname: by_name[(i, iname)] for (i, iname) in by_name if i == index}
        if node["type"] == "PrimitiveNode":
            if "value" in mine:
                node["widgets_values"] = [mine["value"]]
        elif node["type"] in info:
            own = widget_values(node, info[node["type"]])
            node["widgets_values"] = {**own, **mine}
        out_nodes.append(node)

    def ensure_slot(index: int, slot: int, name_: str, widget: str | None = None) -> dict:
        slots = nodes[index]["inputs"]
        while len(slots) <= slot:
            slots.append({"name": None, "link": None})
        if slots[slot].get("name") is None:
            slots[slot]["name"] = name_
        if widget and not slots[slot].get("widget"):
            slots[slot]["widget"] = {"name": widget}
        return slots[slot]

    for index, targets in links_to.items():
        for tslot, link in targets.items():
            if node_at(index) is None or node_at(link[0]) is None:
                continue
            ensure_slot(index, tslot, f"input{tslot}")["link"] = add_link(
                link[0], link[1], index, tslot, link[5] if len(link) > 5 else None)

    sockets = {shown: (index, slot) for shown, index, slot in derived.socket_inputs}
    converted = {shown: (index, slot, iname) for shown, index, slot, iname in derived.converted}
    widget_of = {shown: (index, iname) for shown, index, iname, kind in derived.widgets if kind == "value"}
    for k, slot in enumerate(instance.get("inputs") or []):
        if not isinstance(slot, dict):
            continue
        widget = (slot.get("widget") or {}).get("name") if isinstance(slot.get("widget"), dict) else None
        key = widget or slot.get("name")
        if key in converted:
            index, tslot, iname = converted[key]
            ensure_slot(index, tslot, iname, iname)["link"] = add_link(_INPUT_NODE, k, index, tslot, slot.get("type"))
        elif key in sockets and not widget:
            index, tslot = sockets[key]
            ensure_slot(index, tslot, key)["link"] = add_link(_INPUT_NODE, k, index, tslot, slot.get("type"))
        elif widget and widget in widget_of:
            # a group widget the user turned into a socket on the instance
            index, iname = widget_of[widget]
            slots = nodes[index]["inputs"]
            slots.append({"name": iname, "type": slot.get("type"), "widget": {"name": iname}, "link": None})
            slots[-1]["link"] = add_link(_INPUT_NODE, k, index, len(slots) - 1, slot.get("type"))
        elif k < len(derived.socket_inputs) and not widget:
            _, index, tslot = derived.socket_inputs[k]
            ensure_slot(index, tslot, slot.get("name") or f"input{tslot}")["link"] = add_link(
                _INPUT_NODE, k, index, tslot, slot.get("type"))

    for j, (index, oslot) in enumerate(derived.outputs):
        add_link(index, oslot, _OUTPUT_NODE, j, None)

    return {"id": instance["type"], "name": name, "nodes": out_nodes, "links": sub_links,
            "inputNode": {"id": _INPUT_NODE}, "outputNode": {"id": _OUTPUT_NODE}, "legacy_group": True}
