"""The set of node types a server or executor knows: built-in modules plus plugins.

Plugins are Python packages that declare an entry point in the `sdflow.nodes` group; the entry point names
a module (every decorated function in it is a node), a list of node functions, or a callable returning
either. A third-party package adds nodes without touching sdflow.
"""
from __future__ import annotations

import logging
import types
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points
from typing import Any

from .config import RuntimeConfig
from .node import NodeDef, nodedef_of

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "sdflow.nodes"


class Registry:
    def __init__(self) -> None:
        self._nodes: dict[str, NodeDef] = {}
        self.plugin_errors: dict[str, str] = {}
        # The RuntimeConfig these nodes were set up for (directories); an Executor without a config of
        # its own runs with it.
        self.config: RuntimeConfig | None = None

    @classmethod
    def from_nodes(cls, *sources: Any) -> Registry:
        reg = cls()
        for source in sources:
            reg.add(source)
        return reg

    def add(self, source: Any, *, override: bool = False) -> list[str]:
        """Register a node function, a NodeDef, a module, or an iterable of those."""
        added = []
        for nd in _collect(source):
            if nd.name in self._nodes and not override and self._nodes[nd.name] is not nd:
                log.warning("node type %s from %s replaces the one from %s", nd.name, nd.python_module,
                            self._nodes[nd.name].python_module)
            self._nodes[nd.name] = nd
            added.append(nd.name)
        return added

    def load_plugins(self, group: str = ENTRY_POINT_GROUP) -> list[str]:
        """Load every entry point of `group`. A broken plugin is logged and skipped, never fatal."""
        loaded = []
        for ep in entry_points(group=group):
            try:
                target = ep.load()
                if callable(target) and nodedef_of(target) is None and not isinstance(target, types.ModuleType):
                    target = target()
                names = self.add(target)
                for n in names:
                    self._nodes[n].python_module = f"custom_nodes.{ep.name}"
                loaded.append(ep.name)
            except Exception as exc:  # a plugin must not take the server down
                log.exception("failed to load node plugin %s", ep.name)
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
        return loaded

    def get(self, class_type: str) -> NodeDef | None:
        return self._nodes.get(class_type) if isinstance(class_type, str) else None

    def __contains__(self, class_type: object) -> bool:
        return isinstance(class_type, str) and class_type in self._nodes

    def __iter__(self) -> Iterator[NodeDef]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def names(self) -> list[str]:
        return list(self._nodes)

    def node_info(self, class_type: str) -> dict:
        return self._nodes[class_type].info()

    def object_info(self) -> dict:
        return {name: nd.info() for name, nd in self._nodes.items()}


def _collect(source: Any) -> Iterable[NodeDef]:
    if isinstance(source, NodeDef):
        yield source
        return
    nd = nodedef_of(source)
    if nd is not None:
        yield nd
        return
    if isinstance(source, types.ModuleType):
        for value in vars(source).values():
            found = nodedef_of(value)
            if found is not None:
                yield found
        return
    if isinstance(source, (list, tuple, set)):
        for item in source:
            yield from _collect(item)
        return
    raise TypeError(f"not a node, module or list of nodes: {source!r}")
