"""ComfyUI UI-format (LiteGraph) workflows <-> API-format prompts, converted on the server.

The browser normally does this conversion (the frontend's `graphToPrompt` / `loadApiJson`); doing it here
lets a client post a saved UI workflow straight to `/prompt`, and lets a PNG that only carries an API prompt
be opened in the editor. The only knowledge of nodes used is the `/object_info` schema dict, so this module
stays generic: widget order, sockets and output types all come from there.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, cast

__all__ = [
    "WorkflowFormatError",
    "is_api_prompt",
    "is_ui_workflow",
    "ui_to_api",
    "api_to_ui",
    "unwrap_value",
    "is_link",
    "widget_layout",
    "widget_default",
    "schema_inputs",
    "VIRTUAL_NODE_TYPES",
]


class WorkflowFormatError(ValueError):
    """A workflow document is malformed; the message names the node (id and type) and what is wrong."""


# Input types that the editor shows as a widget (anything else is a socket). A list TYPE is a classic combo.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Options that make the frontend add an upload widget whose value follows the file widget's value.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
# Legacy convention kept by the frontend: INT inputs with these names get a control widget even when the
# schema does not ask for one.
SEED_INPUT_NAMES = frozenset({"seed", "noise_seed"})

REROUTE_TYPES = frozenset({"Reroute", "Reroute (rgthree)"})
PRIMITIVE_TYPES = frozenset({"PrimitiveNode"})
SET_NODE_TYPES = frozenset({"SetNode"})
GET_NODE_TYPES = frozenset({"GetNode"})
# Frontend-only node types: they never reach the backend. A type is treated as virtual only when the
# schema does not define it (a backend node of the same name wins).
VIRTUAL_NODE_TYPES = frozenset(
    {
        "Note",
        "MarkdownNote",
        "Note Plus (mtb)",
        "Label (rgthree)",
        "Bookmark (rgthree)",
        "Fast Groups Muter (rgthree)",
        "Fast Groups Bypasser (rgthree)",
        "Fast Muter (rgthree)",
        "Fast Bypasser (rgthree)",
        "Fast Actions Button (rgthree)",
    }
    | REROUTE_TYPES
    | PRIMITIVE_TYPES
    | SET_NODE_TYPES
    | GET_NODE_TYPES
)

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
_UI_ONLY_WIDGETS = frozenset({"control_after_generate", "control_filter_list", "upload"})


# --------------------------------------------------------------------------------------------------
# Small public helpers


def unwrap_value(v: Any) -> Any:
    """`{"__value__": [...]}` (how a list widget value is kept from reading as a link) -> `[...]`."""
    if isinstance(v, dict) and "__value__" in v:
        return v["__value__"]
    return v


def _wrap_value(v: Any) -> Any:
    # A bare list in an API prompt would be taken for a link (or a list of constants), so wrap it.
    return {"__value__": v} if isinstance(v, list) else v


def is_link(v: Any) -> bool:
    """The backend's link test: `[source_id: str, output_index: int|float]`."""
    return (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], str)
        and isinstance(v[1], (int, float))
        and not isinstance(v[1], bool)
    )


def is_api_prompt(doc: Any) -> bool:
    """True for an API-format prompt: a non-empty object whose every value is a node with `class_type`."""
    return (
        isinstance(doc, dict)
        and len(doc) > 0
        and all(isinstance(v, dict) and "class_type" in v for v in doc.values())
    )


def is_ui_workflow(doc: Any) -> bool:
    """True for a LiteGraph workflow: a `nodes` list plus `links` (schema 0.4) or `version: 1`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        return False
    return isinstance(doc.get("links"), list) or doc.get("version") == 1


# --------------------------------------------------------------------------------------------------
# Schema reading


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: Any  # a type string, or the list of values of a classic combo
    options: dict
    required: bool

    @property
    def type_name(self) -> str:
        return "COMBO" if isinstance(self.type, list) else str(self.type)

    @property
    def is_widget(self) -> bool:
        """The frontend shows this input as a widget (forceInput inputs are sockets only)."""
        return self.is_widget_type and not self.options.get("forceInput")

    @property
    def is_widget_type(self) -> bool:
        return isinstance(self.type, list) or (isinstance(self.type, str) and self.type in WIDGET_TYPES)


def _split_spec(spec: Any) -> tuple[Any, dict]:
    if isinstance(spec, (list, tuple)):
        if not spec:
            return "*", {}
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return spec[0], opts
    return spec, {}


def schema_inputs(class_info: dict) -> list[InputSpec]:
    """Required then optional inputs of a node schema, in declared order (`input_order` when present)."""
    inputs = class_info.get("input") or {}
    order = class_info.get("input_order") or {}
    out: list[InputSpec] = []
    for category in ("required", "optional"):
        specs = inputs.get(category) or {}
        names = [n for n in (order.get(category) or []) if n in specs]
        names += [n for n in specs if n not in names]
        for name in names:
            typ, opts = _split_spec(specs[name])
            out.append(InputSpec(name, typ, opts, category == "required"))
    return out


def _has_control(spec: InputSpec, seed_names: bool) -> bool:
    flag = spec.options.get("control_after_generate")
    if flag is not None:
        return bool(flag)
    return seed_names and spec.type_name == "INT" and spec.name in SEED_INPUT_NAMES


def _layout_entries(
    class_info: dict,
    *,
    upload: bool = True,
    seed_names: bool = True,
    combo_filter: bool = True,
    force_input_widgets: bool = False,
    controls: bool = True,
) -> list[tuple[str, str]]:
    """(input name, slot kind) per widgets_values slot; kind is "value", "control", "filter" or "upload".

    The upload button is how the frontend's upload extension adds it: as an extra input appended to
    `required`, so its value comes after the last required widget (after every widget once the
    frontend sorts by `input_order`, which does not name it). For LoadImage that is right after the
    file name: ["example.png", "image"].
    """
    entries: list[tuple[str, str]] = []
    upload_for: InputSpec | None = None
    specs = schema_inputs(class_info)
    upload_after_all = bool(class_info.get("input_order"))
    for spec in specs:
        if not spec.required and upload_for is not None and not upload_after_all:
            entries.append((upload_for.name, "upload"))
            upload_for = None
        if not spec.is_widget_type:
            continue
        if upload and spec.required and upload_for is None and any(spec.options.get(o) for o in UPLOAD_OPTIONS):
            upload_for = spec
        if spec.options.get("forceInput") and not force_input_widgets:
            continue
        entries.append((spec.name, "value"))
        if controls and _has_control(spec, seed_names):
            entries.append((spec.name, "control"))
            if spec.type_name == "COMBO" and combo_filter:
                entries.append((spec.name, "filter"))
    if upload_for is not None:
        entries.append((upload_for.name, "upload"))
    return entries


def widget_layout(class_info: dict, **variant: bool) -> list[str | None]:
    """Positional layout of a node's `widgets_values`: the widget's input name, or None for a slot the
    frontend stores but never sends (control_after_generate, a combo's filter list, an upload button).

    Keyword flags (`upload`, `seed_names`, `combo_filter`, `force_input_widgets`, `controls`) pick variants
    that different frontend versions wrote; the defaults are what the current frontend writes.
    """
    return [name if kind == "value" else None for name, kind in _layout_entries(class_info, **variant)]


_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})


def _fits(kind: str, spec: InputSpec, value: Any) -> bool:
    """Could the frontend have stored `value` in a slot of this kind (None fits anywhere)?"""
    if value is None:
        return True
    if kind == "control":
        return isinstance(value, bool) or value in _CONTROL_VALUES  # early frontends stored a boolean
    if kind in ("filter", "upload"):
        return isinstance(value, str)
    typ = spec.type_name
    if typ == "INT":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if typ == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ == "BOOLEAN":
        return isinstance(value, bool)
    if typ == "STRING":
        return isinstance(value, str)
    if typ == "COMBO" and isinstance(spec.type, list) and spec.type:
        return value in spec.type or isinstance(value, str)
    return True


def _layout_for_values(class_info: dict, values: list) -> list[str | None]:
    """The layout the node's stored values were written with.

    Candidates: the frontend variants of the same length (fewest departures from the current frontend
    first), then prefixes of longer layouts (an older save that lacks widgets added since). The first
    candidate whose slots the values fit by type wins; with none fitting, the first candidate does.
    """
    defaults = {"upload": True, "seed_names": True, "combo_filter": True, "force_input_widgets": False,
                "controls": True}
    keys = list(defaults)
    variants = []
    for flips in itertools.product((False, True), repeat=len(keys)):
        flags = {k: (not defaults[k]) if f else defaults[k] for k, f in zip(keys, flips)}
        variants.append((sum(flips), flags))
    variants.sort(key=lambda v: v[0])  # stable: fewest departures from the default first
    specs = {s.name: s for s in schema_inputs(class_info)}
    entries = [_layout_entries(class_info, **flags) for _, flags in variants]
    count = len(values)
    candidates = [e for e in entries if len(e) == count] + [e for e in entries if len(e) > count]
    if not candidates:
        return widget_layout(class_info)
    for layout in candidates:
        if all(_fits(kind, specs[name], v) for (name, kind), v in zip(layout, values)):
            return [name if kind == "value" else None for name, kind in layout]
    return [name if kind == "value" else None for name, kind in candidates[0]]


def _output_types(class_info: dict | None) -> list[str]:
    if not class_info:
        return []
    return [("COMBO" if isinstance(t, list) else str(t)) for t in class_info.get("output") or []]


# --------------------------------------------------------------------------------------------------
# UI document parsing


@dataclass(frozen=True)
class _Link:
    id: str
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any


@dataclass(frozen=True)
class _Const:
    value: Any


@dataclass(frozen=True)
class _Ref:
    node_id: str
    slot: int


def _node_label(node: Any) -> str:
    if isinstance(node, dict):
        return f"node {node.get('id')!r} ({node.get('type')!r})"
    return f"node {node!r}"


def _parse_links(raw: Any, where: str) -> dict[str, _Link]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise WorkflowFormatError(f"{where}: 'links' must be a list, got {type(raw).__name__}")
    links: dict[str, _Link] = {}
    for item in raw:
        if item is None:
            continue  # LiteGraph leaves holes where links were deleted
        try:
            if isinstance(item, (list, tuple)):
                lid, oid, oslot, tid, tslot = item[:5]
                ltype = item[5] if len(item) > 5 else None
            elif isinstance(item, dict):
                lid, oid, oslot = item["id"], item["origin_id"], item["origin_slot"]
                tid, tslot, ltype = item["target_id"], item["target_slot"], item.get("type")
            else:
                raise TypeError
            link = _Link(str(lid), str(oid), int(oslot), str(tid), int(tslot), ltype)
        except (KeyError, TypeError, ValueError):
            raise WorkflowFormatError(f"{where}: malformed link {item!r}") from None
        links[link.id] = link
    return links


def _parse_nodes(raw: Any, where: str) -> dict[str, dict]:
    if not isinstance(raw, list):
        raise WorkflowFormatError(f"{where}: 'nodes' must be a list")
    nodes: dict[str, dict] = {}
    for node in raw:
        if not isinstance(node, dict) or "id" not in node:
            raise WorkflowFormatError(f"{where}: {_node_label(node)} is not an object with an 'id'")
        if not isinstance(node.get("type"), str) or not node["type"]:
            raise WorkflowFormatError(f"{where}: {_node_label(node)} has no 'type'")
        for key in ("inputs", "outputs"):
            if node.get(key) is not None and not isinstance(node[key], list):
                raise WorkflowFormatError(f"{where}: {_node_label(node)}: '{key}' must be a list")
            if any(not isinstance(s, dict) for s in node.get(key) or []):
                raise WorkflowFormatError(f"{where}: {_node_label(node)}: every {key[:-1]} slot must be an object")
        wv = node.get("widgets_values")
        if wv is not None and not isinstance(wv, (list, dict)):
            raise WorkflowFormatError(f"{where}: {_node_label(node)}: 'widgets_values' must be a list or an object")
        nid = str(node["id"])
        if nid in nodes:
            raise WorkflowFormatError(f"{where}: duplicate node id {nid!r}")
        nodes[nid] = node
    return nodes


def _mode(node: dict) -> int:
    try:
        return int(node.get("mode") or 0)
    except (TypeError, ValueError):
        raise WorkflowFormatError(f"{_node_label(node)}: invalid mode {node.get('mode')!r}") from None


def _slot_name(slot: dict) -> str | None:
    widget = slot.get("widget")
    if isinstance(widget, dict) and isinstance(widget.get("name"), str):
        return widget["name"]
    name = slot.get("name")
    return name if isinstance(name, str) else None


def _order_key(item: tuple[str, dict]) -> tuple:
    nid, node = item
    order = node.get("order")
    order = order if isinstance(order, (int, float)) and not isinstance(order, bool) else float("inf")
    return (order, int(nid) if nid.lstrip("-").isdigit() else float("inf"), nid)


# --------------------------------------------------------------------------------------------------
# UI -> API


class _Scope:
    """One graph level: the root graph, or the inside of one subgraph instance."""

    def __init__(self, prefix: str, nodes: dict[str, dict], links: dict[str, _Link],
                 parent: _Scope | None = None, instance: dict | None = None,
                 definition: dict | None = None, chain: tuple[str, ...] = ()) -> None:
        self.prefix = prefix
        self.nodes = nodes
        self.links = links
        self.parent = parent
        self.instance = instance
        self.chain = chain  # subgraph definition ids entered so far, to refuse self-nesting
        io_id = lambda key, dflt: str((definition or {}).get(key, {}).get("id", dflt))  # noqa: E731
        self.input_node_id = io_id("inputNode", -10) if definition is not None else None
        self.output_node_id = io_id("outputNode", -20) if definition is not None else None
        self.children: dict[str, _Scope] = {}
        self.legacy_group = bool((definition or {}).get("legacy_group"))


class _UiToApi:
    def __init__(self, workflow: dict, object_info: dict) -> None:
        if not isinstance(workflow, dict):
            raise WorkflowFormatError(f"a UI workflow must be an object, got {type(workflow).__name__}")
        if not isinstance(object_info, dict):
            raise WorkflowFormatError("object_info must be an object")
        if not is_ui_workflow(workflow):
            raise WorkflowFormatError("not a UI workflow: expected a 'nodes' list and a 'links' list")
        self.info = object_info
        self.workflow = workflow
        self.subgraphs: dict[str, dict] = {}
        defs = workflow.get("definitions") or {}
        for sg in (defs.get("subgraphs") or []) if isinstance(defs, dict) else []:
            if isinstance(sg, dict) and isinstance(sg.get("id"), str):
                self.subgraphs[sg["id"]] = sg
        extra = workflow.get("extra")
        if not isinstance(extra, dict):
            extra = {}
        self.group_nodes: dict = extra["groupNodes"] if isinstance(extra.get("groupNodes"), dict) else {}
        self.root = _Scope("", _parse_nodes(workflow["nodes"], "workflow"),
                           _parse_links(workflow.get("links"), "workflow"))
        self.output: dict[str, dict] = {}

    # ---- node kinds
    def _is_subgraph(self, ntype: str) -> bool:
        if ntype in self.info:
            return False
        return ntype in self.subgraphs or self._legacy_group(ntype) is not None

    def _legacy_group(self, ntype: str) -> dict | None:
        from .ui_group_nodes import group_name
        name = group_name(ntype)
        definition = self.group_nodes.get(name) if name is not None else None
        return definition if isinstance(definition, dict) else None

    def _group_as_subgraph(self, node: dict) -> dict:
        from .ui_group_nodes import GroupNodeError, build_definition
        definition = self._legacy_group(node["type"])
        assert definition is not None  # only called for the types is_container found a group definition for
        try:
            return build_definition(node, definition, self.info,
                                    widget_kinds=_group_widget_kinds, schema_inputs=schema_inputs,
                                    widget_values=self._widget_values,
                                    is_widget_type=lambda t: isinstance(t, list) or t in WIDGET_TYPES)
        except GroupNodeError as exc:
            raise WorkflowFormatError(f"{_node_label(node)}: {exc}") from None

    def _is_virtual(self, ntype: str) -> bool:
        return ntype not in self.info and ntype in VIRTUAL_NODE_TYPES

    def _child(self, scope: _Scope, node: dict) -> _Scope:
        nid = str(node["id"])
        if nid not in scope.children:
            sgid = node["type"]
            if sgid in scope.chain:
                raise WorkflowFormatError(f"{_node_label(node)}: subgraph {sgid!r} contains itself")
            sg = self.subgraphs[sgid] if sgid in self.subgraphs else self._group_as_subgraph(node)
            where = f"subgraph {sg.get('name') or sgid!r} (instance {scope.prefix}{nid})"
            scope.children[nid] = _Scope(
                f"{scope.prefix}{nid}:", _parse_nodes(sg.get("nodes") or [], where),
                _parse_links(sg.get("links"), where), parent=scope, instance=node,
                definition=sg, chain=scope.chain + (sgid,))
        return scope.children[nid]

    # ---- link resolution
    def _resolve_link(self, scope: _Scope, link_id: Any, seen: set) -> _Const | _Ref | None:
        if link_id is None:
            return None
        link = scope.links.get(str(link_id))
        if link is None:
            return None  # a dangling link id: treat the input as unconnected
        return self._resolve_output(scope, link.origin_id, link.origin_slot, link.type, seen)

    def _resolve_output(self, scope: _Scope, node_id: str, slot: int, link_type: Any,
                        seen: set) -> _Const | _Ref | None:
        key = (scope.prefix, node_id, slot)
        if key in seen:
            raise WorkflowFormatError(
                f"node {scope.prefix}{node_id}: links loop through reroutes, bypassed nodes or subgraphs")
        seen = seen | {key}

        if scope.parent is not None and node_id == scope.input_node_id:
            return self._resolve_subgraph_input(scope, slot, seen)
        node = scope.nodes.get(node_id)
        if node is None:
            return None
        ntype = node["type"]
        if self._is_virtual(ntype):
            return self._resolve_virtual(scope, node, seen)
        mode = _mode(node)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            return self._resolve_bypass(scope, node, slot, link_type, seen)
        if self._is_subgraph(ntype):
            child = self._child(scope, node)
            for link in child.links.values():
                if link.target_id == child.output_node_id and link.target_slot == slot:
                    return self._resolve_output(child, link.origin_id, link.origin_slot, link.type, seen)
            return None
        return _Ref(scope.prefix + node_id, slot)

    def _resolve_subgraph_input(self, scope: _Scope, slot: int, seen: set) -> _Const | _Ref | None:
        inst = scope.instance or {}
        slots = inst.get("inputs") or []
        if slot >= len(slots):
            return None
        assert scope.parent is not None  # only a subgraph's inside has subgraph inputs
        found = self._resolve_link(scope.parent, slots[slot].get("link"), seen)
        if found is not None:
            return found
        if scope.legacy_group:
            return None  # the inner node already carries the instance's widget value
        # Unconnected subgraph input that the instance shows as a widget: its value is the
        # instance's widget value (widgets follow the widget inputs in order).
        if slots[slot].get("widget") and isinstance(inst.get("widgets_values"), list):
            widget_slots = [i for i, s in enumerate(slots) if s.get("widget")]
            pos = widget_slots.index(slot)
            values = inst["widgets_values"]
            if pos < len(values) and values[pos] is not None:
                return _Const(values[pos])
        return None

    def _resolve_virtual(self, scope: _Scope, node: dict, seen: set) -> _Const | _Ref | None:
        ntype = node["type"]
        inputs = node.get("inputs") or []
        if ntype in REROUTE_TYPES:
            return self._resolve_link(scope, inputs[0].get("link"), seen) if inputs else None
        if ntype in PRIMITIVE_TYPES:
            values = node.get("widgets_values")
            if isinstance(values, list) and values and values[0] is not None:
                return _Const(values[0])
            return None
        if ntype in GET_NODE_TYPES:
            name = _first_widget_value(node)
            for setter in scope.nodes.values():
                if setter["type"] in SET_NODE_TYPES and _first_widget_value(setter) == name and name is not None:
                    s_inputs = setter.get("inputs") or []
                    return self._resolve_link(scope, s_inputs[0].get("link"), seen) if s_inputs else None
            return None
        return None

    def _resolve_bypass(self, scope: _Scope, node: dict, slot: int, link_type: Any,
                        seen: set) -> _Const | _Ref | None:
        outputs = node.get("outputs") or []
        want = outputs[slot].get("type") if slot < len(outputs) else None
        if want is None:
            types = _output_types(self.info.get(node["type"]))
            want = types[slot] if slot < len(types) else link_type
        inputs = node.get("inputs") or []
        # Prefer the input at the same index as the output (a pass-through node), then the first of
        # the same type -- the same choice the frontend makes.
        for i in itertools.chain([slot], range(len(inputs))):
            if i < len(inputs) and inputs[i].get("type") == want:
                return self._resolve_link(scope, inputs[i].get("link"), seen)
        return None

    # ---- emission
    def run(self) -> dict[str, dict]:
        self._emit_scope(self.root)
        return self.output

    def _emit_scope(self, scope: _Scope) -> None:
        for nid, node in sorted(scope.nodes.items(), key=_order_key):
            ntype = node["type"]
            if _mode(node) in (MODE_NEVER, MODE_BYPASS):
                continue
            if self._is_subgraph(ntype):
                self._emit_scope(self._child(scope, node))
                continue
            if self._is_virtual(ntype):
                continue
            self._emit_node(scope, nid, node)

    def _emit_node(self, scope: _Scope, nid: str, node: dict) -> None:
        ntype = node["type"]
        class_info = self.info.get(ntype)
        inputs: dict[str, Any] = {}
        for name, value in self._widget_values(node, class_info).items():
            if value is not None:
                inputs[name] = _wrap_value(value)
        for slot in node.get("inputs") or []:
            slot_name = _slot_name(slot)
            if slot_name is None or slot.get("link") is None:
                continue
            found = self._resolve_link(scope, slot["link"], set())
            if isinstance(found, _Ref):
                inputs[slot_name] = [found.node_id, found.slot]
            elif isinstance(found, _Const):
                inputs[slot_name] = _wrap_value(found.value)
            # Unresolved (muted source, bypass with no matching input, deleted node): a socket input is
            # left out; a converted widget keeps its own widget value, which is what the user sees.
        if class_info:
            order = [s.name for s in schema_inputs(class_info)]
            inputs = {k: inputs[k] for k in order if k in inputs} | {k: v for k, v in inputs.items() if k not in order}
        title = node.get("title")
        if not isinstance(title, str) or not title:
            title = (class_info or {}).get("display_name") or ntype
        self.output[scope.prefix + nid] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}

    @staticmethod
    def _widget_values(node: dict, class_info: dict | None) -> dict[str, Any]:
        values = node.get("widgets_values")
        if values is None:
            # Saved without widgets_values (hand-written or stripped files): every widget shows its default.
            return _with_widget_defaults({}, class_info, widget_layout(class_info)) if class_info else {}
        if isinstance(values, dict):
            # Some custom nodes serialize widgets by name. Drop the frontend-only ones (previews named
            # "$$...", control and upload buttons); everything else is an input value.
            return {k: v for k, v in values.items()
                    if isinstance(k, str) and not k.startswith("$$") and k not in _UI_ONLY_WIDGETS}
        if class_info:
            layout = _layout_for_values(class_info, values)
            found = {name: value for name, value in zip(layout, values) if name is not None}
            # Older saves lack widgets added since; the frontend gives those their schema default on load.
            return _with_widget_defaults(found, class_info, layout[len(values):])
        # Unknown node type: newer frontends give every widget an input slot named after it, in widget
        # order; use that only when the counts agree (control slots would shift everything otherwise).
        names = [_slot_name(s) for s in node.get("inputs") or [] if isinstance(s.get("widget"), dict)]
        if names and len(names) == len(values) and None not in names:
            return dict(zip(cast("list[str]", names), values))
        return {}


def widget_default(spec: InputSpec) -> Any:
    """The value a freshly created widget shows: the schema default, else the first combo choice, else
    the type's zero clamped into its range (how the frontend initialises a widget)."""
    if "default" in spec.options:
        return spec.options["default"]
    if isinstance(spec.type, list):
        return spec.type[0] if spec.type else None
    zero = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec.type_name)
    if spec.type_name == "COMBO":
        options = spec.options.get("options")
        return options[0] if isinstance(options, list) and options else None
    if isinstance(zero, (int, float)) and not isinstance(zero, bool):
        low, high = spec.options.get("min"), spec.options.get("max")
        if isinstance(low, (int, float)) and zero < low:
            zero = low
        if isinstance(high, (int, float)) and zero > high:
            zero = high
    return zero


def _with_widget_defaults(found: dict[str, Any], class_info: dict, missing: list[str | None]) -> dict[str, Any]:
    specs = {s.name: s for s in schema_inputs(class_info)}
    out = dict(found)
    for name in missing:
        if name is not None and name not in out and name in specs:
            value = widget_default(specs[name])
            if value is not None:
                out[name] = value
    return out


def _group_widget_kinds(node: dict, index: int, info: dict, inputs: list, links_from: dict) -> list[tuple[str, str]]:
    """(input name, slot kind) of the widgets an inner node of a legacy group node gives the group."""
    class_info = info.get(node.get("type"))
    if class_info:
        return _layout_entries(class_info)
    if node.get("type") == "PrimitiveNode" and inputs:
        typ = inputs[0][1]
        kinds = [("value", "value")]
        # the group gives a linked primitive a control widget (numbers and combos have one)
        if isinstance(typ, list) or typ in ("INT", "FLOAT", "COMBO"):
            kinds.append(("value", "control"))
        if isinstance(typ, list) or typ == "COMBO":
            kinds.append(("value", "filter"))
        return kinds
    return []


def _first_widget_value(node: dict) -> Any:
    values = node.get("widgets_values")
    if isinstance(values, list) and values:
        return values[0]
    if isinstance(values, dict) and values:
        return next(iter(values.values()))
    return None


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (schema 0.4 or 1, with subgraphs) into an API-format prompt.

    Each emitted node carries `_meta: {"title"}`. Muted nodes are left out, bypassed nodes are bridged
    by type, reroutes and primitive nodes are resolved, notes are dropped. A node type unknown to
    `object_info` is still emitted (with the inputs that can be named) so validation can report it.
    """
    return _UiToApi(workflow, object_info).run()


# --------------------------------------------------------------------------------------------------
# API -> UI


def _ui_id(key: str) -> int | str:
    # LiteGraph ids are ints; keep anything else (subgraph paths "12:5", expansion ids) as a string id,
    # which LiteGraph tolerates, so converting back yields the same keys.
    if key.isdigit() and str(int(key)) == key:
        return int(key)
    return key


def _depths(prompt: dict[str, dict]) -> dict[str, int]:
    """Longest-path depth of each node from the sources (iterative: long chains must not recurse)."""
    def sources(nid: str) -> list[str]:
        return [v[0] for v in (prompt[nid].get("inputs") or {}).values() if is_link(v) and v[0] in prompt]

    depth: dict[str, int] = {}
    for start in prompt:
        if start in depth:
            continue
        on_path = {start}
        stack = [(start, iter(sources(start)))]
        while stack:
            nid, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                stack.pop()
                on_path.discard(nid)
                depth[nid] = max((depth.get(src, 0) + 1 for src in sources(nid)), default=0)
            elif nxt not in depth and nxt not in on_path:  # a cycle is validation's to report
                on_path.add(nxt)
                stack.append((nxt, iter(sources(nxt))))
    return depth


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """Build a schema-0.4 UI workflow from an API prompt (what the frontend's `loadApiJson` does).

    Nodes are laid out in columns by depth. Widget values follow the schema's positional layout; a
    widget the prompt does not set is stored as null so that `ui_to_api` gives back the same prompt.
    """
    if not is_api_prompt(prompt):
        raise WorkflowFormatError("not an API prompt: every value must be a node object with 'class_type'")
    for nid, node in prompt.items():
        if not isinstance(node.get("class_type"), str):
            raise WorkflowFormatError(f"node {nid!r}: 'class_type' must be a string")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowFormatError(f"node {nid!r} ({node['class_type']!r}): 'inputs' must be an object")

    depth = _depths(prompt)
    order = sorted(prompt, key=lambda k: (depth[k], _order_key((k, {}))))
    ui_nodes: dict[str, dict] = {}
    pending_links: list[tuple[str, int, str, int, Any]] = []  # origin, slot, target, target slot, input type

    rows: dict[int, int] = {}
    for index, nid in enumerate(order):
        node = prompt[nid]
        ctype = node["class_type"]
        info = object_info.get(ctype)
        api_inputs: dict[str, Any] = node.get("inputs") or {}
        slots: list[dict] = []

        def add_slot(name: str, typ: str, value: Any, widget: bool, nid: str = nid, slots: list[dict] = slots) -> None:
            slot: dict[str, Any] = {"name": name, "type": typ, "link": None}
            if widget:
                slot["widget"] = {"name": name}
            if is_link(value):
                pending_links.append((value[0], int(value[1]), nid, len(slots), typ))
            slots.append(slot)

        widgets_values: list | dict
        if info:
            specs = schema_inputs(info)
            spec_names = {s.name for s in specs}
            for spec in specs:
                value = api_inputs.get(spec.name)
                if not spec.is_widget:
                    add_slot(spec.name, spec.type_name, value, False)
                elif is_link(value):
                    add_slot(spec.name, spec.type_name, value, True)
            for name, value in api_inputs.items():
                if name not in spec_names and is_link(value):
                    add_slot(name, "*", value, False)
            placeable = {name for name, kind in _layout_entries(info) if kind == "value"}
            stray = [n for n, v in api_inputs.items() if n not in placeable and not is_link(v)]
            if stray:
                # Constants the schema has no widget for cannot be placed positionally: keep them all by
                # name (the dict form some custom nodes use) rather than lose them.
                widgets_values = {n: unwrap_value(v) for n, v in api_inputs.items() if not is_link(v)}
            else:
                widgets_values = []
                spec_by_name = {s.name: s for s in specs}
                for name, kind in _layout_entries(info):
                    if kind != "value":
                        widgets_values.append(_extra_slot_value(kind, spec_by_name[name]))
                        continue
                    value = api_inputs.get(name)
                    widgets_values.append(None if value is None or is_link(value) else unwrap_value(value))
            out_types = _output_types(info)
            outputs = [
                {"name": name, "type": typ, "links": [], "slot_index": i}
                for i, (typ, name) in enumerate(zip(out_types, info.get("output_name") or out_types))
            ]
            title_default = info.get("display_name") or ctype
        else:
            for name, value in api_inputs.items():
                if is_link(value):
                    add_slot(name, "*", value, False)
            widgets_values = {n: unwrap_value(v) for n, v in api_inputs.items() if not is_link(v)}
            outputs = []
            title_default = ctype

        col_row = rows.get(depth[nid], 0)
        rows[depth[nid]] = col_row + 1
        ui_node: dict[str, Any] = {
            "id": _ui_id(nid),
            "type": ctype,
            "pos": [50 + 380 * depth[nid], 50 + 260 * col_row],
            "size": [315, 46 + 22 * (len(slots) + len(outputs)) + 24 * len(widgets_values)],
            "flags": {},
            "order": index,
            "mode": MODE_ALWAYS,
            "inputs": slots,
            "outputs": outputs,
            "properties": {"Node name for S&R": ctype},
            "widgets_values": widgets_values,
        }
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else None
        if isinstance(title, str) and title and title != title_default:
            ui_node["title"] = title
        ui_nodes[nid] = ui_node

    links: list[list] = []
    for origin, oslot, target, tslot, in_type in pending_links:
        source = ui_nodes.get(origin)
        if source is None:
            continue  # the prompt links to a node it does not contain; validation reports that
        outs = source["outputs"]
        while len(outs) <= oslot:  # unknown node type: grow outputs as links reveal them
            outs.append({"name": "*", "type": "*", "links": [], "slot_index": len(outs)})
        ltype = outs[oslot]["type"] if outs[oslot]["type"] != "*" else in_type
        link_id = len(links) + 1
        links.append([link_id, source["id"], oslot, ui_nodes[target]["id"], tslot, ltype])
        outs[oslot]["links"].append(link_id)
        ui_nodes[target]["inputs"][tslot]["link"] = link_id

    int_ids = [n["id"] for n in ui_nodes.values() if isinstance(n["id"], int)]
    return {
        "last_node_id": max(int_ids, default=0),
        "last_link_id": len(links),
        "nodes": list(ui_nodes.values()),
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": 0.4,
    }


def _extra_slot_value(kind: str, spec: InputSpec) -> Any:
    # Values for slots the backend never sees. "fixed" keeps the loaded graph reproducing the prompt
    # (a "randomize" control would change the seed on the next queue).
    if kind == "control":
        return "fixed"
    if kind == "filter":
        return ""
    for option in UPLOAD_OPTIONS:
        if spec.options.get(option):
            return "image" if option in ("image_upload", "animated_image_upload") else option.split("_")[0]
    return None
