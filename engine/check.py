"""What a workflow needs that this installation lacks, found before anything runs.

The two failures ComfyUI users meet most on someone else's workflow are a node class that is not
installed and a model file that is not in the model folders. `check_prompt` lists both in one report. It
is generic: which inputs name model files, and whether a file is there, come from a `ModelLocator` that the
SD side supplies (the engine knows no model folders).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .registry import Registry

__all__ = ["ModelLocator", "MissingNode", "MissingModel", "CheckReport", "check_prompt"]


class ModelLocator(Protocol):
    def model_inputs(self, class_type: str) -> dict[str, str]:
        """Input name -> model folder key, for the inputs of `class_type` that name a model file."""

    def has_model(self, folder: str, name: str) -> bool:
        """Whether `name` is present in `folder` (False for a name that would leave the folder)."""

    def folder_paths(self, folder: str) -> list[str]:
        """The directories searched for `folder`, first one first."""


@dataclass
class MissingNode:
    class_type: str
    node_ids: list[str]

    def to_dict(self) -> dict:
        return {"class_type": self.class_type, "node_ids": self.node_ids}


@dataclass
class MissingModel:
    name: str
    folder: str
    paths: list[str]
    uses: list[tuple[str, str, str]]   # (node id, class type, input name)

    def to_dict(self) -> dict:
        return {"name": self.name, "folder": self.folder, "paths": self.paths,
                "nodes": [{"node_id": n, "class_type": c, "input": i} for n, c, i in self.uses]}


@dataclass
class CheckReport:
    missing_nodes: list[MissingNode] = field(default_factory=list)
    missing_models: list[MissingModel] = field(default_factory=list)
    node_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing_nodes and not self.missing_models

    def to_dict(self) -> dict:
        return {"ok": self.ok, "node_count": self.node_count,
                "missing_nodes": [m.to_dict() for m in self.missing_nodes],
                "missing_models": [m.to_dict() for m in self.missing_models]}

    def format(self) -> str:
        if self.ok:
            return f"ok: {self.node_count} nodes; every node class is installed and every model file is present"
        lines: list[str] = []
        if self.missing_nodes:
            lines.append(f"missing node classes ({len(self.missing_nodes)}):")
            for node in self.missing_nodes:
                lines.append(f"  {node.class_type}  (node {', '.join(node.node_ids)})")
        if self.missing_models:
            lines.append(f"missing model files ({len(self.missing_models)}):")
            for m in self.missing_models:
                where = ", ".join(f"{n} {c}.{i}" for n, c, i in m.uses)
                put = m.paths[0] if m.paths else m.folder
                lines.append(f"  {m.folder}/{m.name}  (node {where}); put it in {put}")
        return "\n".join(lines)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _sort_key(nid: str) -> tuple:
    head = nid.split(":", 1)[0]
    return (int(head) if head.isdigit() else float("inf"), nid)


def check_prompt(prompt: dict, registry: Registry, locator: ModelLocator | None = None) -> CheckReport:
    """Missing node classes and missing model files of an API-format prompt (nothing is loaded or run)."""
    report = CheckReport(node_count=len(prompt))
    missing_nodes: dict[str, list[str]] = {}
    missing_models: dict[tuple[str, str], MissingModel] = {}
    for nid in sorted(prompt, key=_sort_key):
        node = prompt[nid]
        if not isinstance(node, dict):
            continue
        class_type = node.get("class_type")
        if not isinstance(class_type, str):
            continue
        if class_type not in registry:
            missing_nodes.setdefault(class_type, []).append(str(nid))
        if locator is None:
            continue
        inputs: dict = node["inputs"] if isinstance(node.get("inputs"), dict) else {}
        for input_name, folder in locator.model_inputs(class_type).items():
            value = inputs.get(input_name)
            if not isinstance(value, str) or not value or _is_link(value):
                continue
            if locator.has_model(folder, value):
                continue
            entry = missing_models.get((folder, value))
            if entry is None:
                entry = missing_models[(folder, value)] = MissingModel(value, folder, locator.folder_paths(folder), [])
            entry.uses.append((str(nid), class_type, input_name))
    report.missing_nodes = [MissingNode(c, ids) for c, ids in missing_nodes.items()]
    report.missing_models = list(missing_models.values())
    return report
