"""ComfyUI's `comfy_api.latest`: `io` (the V3 schema), `ComfyExtension`, and packs' `comfy_entrypoint()`."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any

from . import v3_io as io

__all__ = ["ComfyExtension", "io", "extension_classes"]


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


def extension_classes(module: Any) -> dict[str, type]:
    """Classic classes for a pack's V3 nodes: from `comfy_entrypoint()` and V3 classes in its
    NODE_CLASS_MAPPINGS, by node id."""
    found: dict[str, type] = {}
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if isinstance(mappings, dict):
        for name, cls in mappings.items():
            if io.is_v3(cls):
                found[name] = io.classic_class(cls)
    entry = getattr(module, "comfy_entrypoint", None)
    if callable(entry):
        async def nodes() -> list:
            extension = entry()
            if inspect.isawaitable(extension):
                extension = await extension
            await extension.on_load()
            return list(await extension.get_node_list())
        for cls in asyncio.run(nodes()):
            adapted = io.classic_class(cls)
            found[adapted.SDFLOW_NODE_ID] = adapted   # type: ignore[attr-defined]
    return found
