"""The ComfyUI helper modules custom-node packs import (`folder_paths`, `comfy.*`, `node_helpers`, ...),
written for sdflow's SD domain, and the loading of packs with them in place.

Nothing here is imported, and nothing is put into `sys.modules`, unless custom nodes are loaded: `install()`
is the `prepare` hook of `engine.custom_nodes.load_packs`, run once before the first pack's import.
"""
from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.custom_nodes import Pack, load_packs
from engine.registry import Registry

log = logging.getLogger(__name__)

# ComfyUI's module name -> the shim in this package.
SHIMS = {
    "folder_paths": "folder_paths",
    "comfy.model_management": "model_management",
    "comfy.utils": "utils",
    "comfy.samplers": "samplers",
    "comfy.cli_args": "cli_args",
    "latent_preview": "latent_preview",
    "node_helpers": "node_helpers",
    "comfy_execution.graph_utils": "graph_utils",
    "comfy_execution.graph": "graph_utils",
    "comfy_api.latest": "v3",
    "comfy_api.latest.io": "v3_io",
}


def install(registry: Registry | None = None) -> None:
    """Put the shims into sys.modules under ComfyUI's names, and stubs for the rest of ComfyUI."""
    from . import classes
    from .stubs import install_finder

    install_finder()
    if registry is not None:
        classes.bind(registry)
    for alias, shim in SHIMS.items():
        if alias in sys.modules and not getattr(sys.modules[alias], "__sdflow_stub__", False):
            continue
        module = importlib.import_module(f"{__name__}.{shim}")
        sys.modules[alias] = module
        parent, _, leaf = alias.rpartition(".")
        if parent:
            setattr(importlib.import_module(parent), leaf, module)


def custom_node_folders(folders: Any, given: Iterable[str | Path] = ()) -> list[Path]:
    """The folders packs load from: the ones given (else `<data-dir>/custom_nodes`), plus the
    `custom_nodes` entries of extra_model_paths.yaml."""
    configured = [Path(p) for p in folders.paths("custom_nodes")]
    chosen = [Path(p) for p in given]
    if not chosen:
        return configured
    default = folders.base_dir / "custom_nodes"
    return chosen + [p for p in configured if p != default and p not in chosen]


def load_custom_nodes(registry: Registry, folders: Iterable[str | Path]) -> list[Pack]:
    """Load every pack in the folders into `registry`, each in isolation; the report per pack."""
    from . import classes
    from .v3 import extension_classes

    packs = load_packs(list(folders), registry, prepare=lambda: install(registry), classes=extension_classes)
    for pack in packs:
        module = sys.modules.get(pack.name)
        mappings = dict(getattr(module, "NODE_CLASS_MAPPINGS", None) or {}) if pack.ok else None
        if mappings is not None:
            classes.add_pack_classes({n: c for n, c in mappings.items() if n in pack.nodes},
                                     getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None))
    return packs
