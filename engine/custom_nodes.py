"""Loading ComfyUI custom-node packs from folders, each in isolation.

A pack is a package folder (its `__init__.py` defines `NODE_CLASS_MAPPINGS`, optionally
`NODE_DISPLAY_NAME_MAPPINGS` and `WEB_DIRECTORY`) or a single `.py` file defining the same, as ComfyUI
loads them from `custom_nodes/`. Each is imported under its own name; one that fails to import (or whose
classes cannot be mapped) is reported by name with its error, and the others still load. Built-in node
names cannot be replaced by a pack (ComfyUI's rule as well). Folders ending in `.disabled`, hidden entries
and `__pycache__` are skipped.

Packs are arbitrary code: they are loaded only from the folders the configuration names, never fetched.
`prepare()` runs once before the first import; the SD domain uses it to install the ComfyUI helper modules
(`folder_paths`, `comfy.*`, ...) that packs import at load time.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .classic import ClassicNodeError, nodedef_from_class
from .registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Pack:
    name: str
    path: Path
    nodes: list[str] = field(default_factory=list)
    web_directory: Path | None = None
    error: str | None = None
    skipped: list[str] = field(default_factory=list)     # class names refused, with the reason
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> dict:
        return {"name": self.name, "path": str(self.path), "nodes": self.nodes, "error": self.error,
                "skipped": self.skipped, "web_directory": str(self.web_directory) if self.web_directory else None,
                "seconds": round(self.seconds, 3)}


def discover(folders: Iterable[str | Path]) -> list[Path]:
    """Pack entries in the folders, in name order per folder (ComfyUI's order)."""
    found: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            name = entry.name
            if name.startswith(".") or name == "__pycache__" or name.endswith(".disabled"):
                continue
            if entry.is_dir() and (entry / "__init__.py").is_file():
                found.append(entry)
            elif entry.is_file() and entry.suffix == ".py":
                found.append(entry)
    return found


def load_packs(folders: Iterable[str | Path], registry: Registry, *,
               prepare: Callable[[], None] | None = None,
               classes: Callable[[Any], dict[str, type]] | None = None) -> list[Pack]:
    """`classes(module)`: more node classes of a pack beyond NODE_CLASS_MAPPINGS, or replacements for
    entries of it, in the classic protocol (the SD domain adapts ComfyUI's V3 nodes this way)."""
    entries = discover(folders)
    if not entries:
        return []
    if prepare is not None:
        prepare()
    builtin = set(registry.names())
    packs = []
    for entry in entries:
        pack = load_pack(entry, registry, protected=builtin, classes=classes)
        packs.append(pack)
        if pack.ok:
            log.info("custom nodes: %s (%d nodes, %.2f s)", pack.name, len(pack.nodes), pack.seconds)
        else:
            log.error("custom nodes: %s failed to load: %s", pack.name, pack.error)
    return packs


def load_pack(entry: Path, registry: Registry, *, protected: set[str] | frozenset[str] = frozenset(),
              classes: Callable[[Any], dict[str, type]] | None = None) -> Pack:
    started = time.perf_counter()
    name = entry.stem if entry.is_file() else entry.name
    pack = Pack(name=name, path=entry)
    try:
        module = _import(entry, name)
    except BaseException as exc:   # a pack's import may raise anything, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        pack.error = _describe(exc)
        pack.seconds = time.perf_counter() - started
        return pack
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    extra: dict[str, type] = {}
    if classes is not None:
        try:
            extra = classes(module)
        except Exception as exc:
            pack.error = _describe(exc)
            pack.seconds = time.perf_counter() - started
            return pack
    if extra:
        mappings = {**(mappings if isinstance(mappings, dict) else {}), **extra}
    if not isinstance(mappings, dict):
        pack.error = "defines no NODE_CLASS_MAPPINGS dict"
        pack.seconds = time.perf_counter() - started
        return pack
    display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
    for class_name, cls in mappings.items():
        if class_name in protected:
            pack.skipped.append(f"{class_name}: a built-in node of that name exists")
            continue
        try:
            shown = display.get(class_name) or getattr(cls, "DISPLAY_NAME", None)
            nd = nodedef_from_class(class_name, cls, display_name=shown,
                                    python_module=f"custom_nodes.{name}")
        except ClassicNodeError as exc:
            pack.skipped.append(str(exc))
            continue
        registry.add(nd, override=True)
        pack.nodes.append(class_name)
    web = getattr(module, "WEB_DIRECTORY", None)
    if isinstance(web, str) and entry.is_dir():
        candidate = (entry / web).resolve()
        if candidate.is_dir() and candidate.is_relative_to(entry.resolve()):
            pack.web_directory = candidate
    pack.seconds = time.perf_counter() - started
    return pack


def _import(entry: Path, name: str) -> Any:
    # Many packs import their own modules absolutely, or by the folder's name: ComfyUI makes both work by
    # having the custom_nodes folder importable, so it is appended (never prepended) to sys.path.
    parent = str(entry.parent)
    if parent not in sys.path:
        sys.path.append(parent)
    if entry.is_dir():
        spec = importlib.util.spec_from_file_location(name, entry / "__init__.py",
                                                      submodule_search_locations=[str(entry)])
    else:
        spec = importlib.util.spec_from_file_location(name, entry)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {entry.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        for sub in [m for m in sys.modules if m.startswith(name + ".")]:
            sys.modules.pop(sub, None)
        raise
    return module


def _describe(exc: BaseException) -> str:
    """The error and the pack's own innermost frame, without absolute paths above the pack."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"
