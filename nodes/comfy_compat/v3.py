"""ComfyUI's `comfy_api.latest`: `io` (the V3 schema), `ComfyExtension`, and packs' `comfy_entrypoint()`."""
from __future__ import annotations

import asyncio
import inspect
import sys
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


def __getattr__(name: str) -> Any:
    # The rest of `comfy_api.latest` (`ui`, `Types`, `InputImpl`, ...): packs import them next to `io` at
    # their top, so they import as stubs (members raise "not supported by sdflow" when used) and the
    # pack's other nodes still load.
    if name.startswith("__"):
        raise AttributeError(name)
    from .stubs import StubModule, placeholder

    value: Any
    if name.islower():
        value = sys.modules.get(f"comfy_api.latest.{name}")
        if value is None:
            value = StubModule(f"comfy_api.latest.{name}")
            value.__path__ = []
            value.__sdflow_stub__ = True
            sys.modules[value.__name__] = value
    else:
        value = placeholder("comfy_api.latest", name)
    globals()[name] = value
    return value
