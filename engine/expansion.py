"""Node expansion and execution blocking, as ComfyUI's custom nodes use them.

- A node may return `{"expand": graph, "result": (...)}`: `graph` is an API-format sub-graph (or a builder
  with `finalize()`), and each result item is a value or a link `[node_id, slot]` into it. The executor
  validates and runs the sub-graph in place and hands its outputs on as the node's outputs.
- `ExecutionBlocker(message)` as an output value stops the nodes downstream of it: they do not run and pass
  the blocker on; with a message, the node that receives it fails with that message.
- `GraphBuilder` builds such sub-graphs with ComfyUI's method names (`node`, `out`, `set_input`, `finalize`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from .inputs import SocketSpec
from .node import InputDecl, NodeDef


class ExecutionBlocker:
    def __init__(self, message: str | None = None) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


@dataclass
class Expansion:
    graph: dict
    result: tuple


def expansion_from(ret: Any) -> Expansion | None:
    """The Expansion a node's return value asks for, or None."""
    if not isinstance(ret, dict) or "expand" not in ret:
        return None
    graph = ret["expand"]
    if hasattr(graph, "finalize"):
        graph = graph.finalize()
    if not isinstance(graph, dict):
        raise TypeError(f"'expand' must be a graph (dict or GraphBuilder), got {type(graph).__name__}")
    return Expansion(graph, tuple(ret.get("result") or ()))


def is_link(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def prefixed(graph: dict, prefix: str) -> dict:
    """The sub-graph with its node ids (and the links between them) prefixed, so they cannot collide with the
    parent prompt's ids; links to ids outside the sub-graph (the parent's nodes) are kept."""
    out = {}
    for nid, node in graph.items():
        inputs = {k: ([prefix + v[0], v[1]] if is_link(v) and v[0] in graph else v)
                  for k, v in dict(node.get("inputs") or {}).items()}
        out[prefix + str(nid)] = {**node, "inputs": inputs}
    return out


SINK = "__sdflow_expansion_result__"


def sink_def(count: int) -> NodeDef:
    """An output node taking `count` links of any type: what the sub-graph's validation is asked for."""
    inputs = {f"r{i}": InputDecl(f"r{i}", SocketSpec(wire="*"), "required") for i in range(count)}
    return NodeDef(name=SINK, fn=lambda **_: None, inputs=inputs, outputs=[], output_node=True)


class RegistryWithSink:
    """A registry view that also knows the sink node (for one validation)."""

    def __init__(self, registry: Any, sink: NodeDef) -> None:
        self._registry, self._sink = registry, sink

    def get(self, class_type: str) -> NodeDef | None:
        return self._sink if class_type == SINK else self._registry.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type == SINK or class_type in self._registry

    def names(self) -> list[str]:
        return self._registry.names()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)


class GraphBuilder:
    """Builds an API-format sub-graph for node expansion."""

    _ids = itertools.count(1)

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else f"gb{next(self._ids)}."
        self.nodes: dict[str, Node] = {}
        self._next = 1

    @classmethod
    def set_default_prefix(cls, *args: Any, **kwargs: Any) -> None:
        """ComfyUI sets a per-call prefix here; sdflow's executor prefixes the ids itself."""

    def node(self, class_type: str, id: str | None = None, **kwargs: Any) -> Node:
        if id is None:
            id = str(self._next)
            self._next += 1
        node_id = self.prefix + str(id)
        if node_id in self.nodes:
            return self.nodes[node_id]
        made = self.nodes[node_id] = Node(node_id, class_type, kwargs)
        return made

    def lookup_node(self, id: str) -> Node | None:
        return self.nodes.get(self.prefix + str(id))

    def remove_node(self, id: str) -> None:
        self.nodes.pop(self.prefix + str(id), None)

    def finalize(self) -> dict:
        return {nid: node.serialize() for nid, node in self.nodes.items()}


class Node:
    def __init__(self, id: str, class_type: str, inputs: dict) -> None:
        self.id, self.class_type = id, class_type
        self.inputs = dict(inputs)
        self.override_display_id: str | None = None

    def out(self, index: int) -> list:
        return [self.id, index]

    def set_input(self, key: str, value: Any) -> None:
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_input(self, key: str) -> Any:
        return self.inputs.get(key)

    def set_override_display_id(self, override_display_id: str) -> None:
        self.override_display_id = override_display_id

    def serialize(self) -> dict:
        inputs = {k: (v.out(0) if isinstance(v, Node) else v) for k, v in self.inputs.items()}
        out: dict[str, Any] = {"class_type": self.class_type, "inputs": inputs}
        if self.override_display_id is not None:
            out["override_display_id"] = self.override_display_id
        return out
