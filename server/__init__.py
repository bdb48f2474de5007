"""sdflow server: the aiohttp application (ComfyUI-compatible HTTP/websocket API), its durable queue worker,
and the `sdflow` CLI."""
from typing import Any


def __getattr__(name: str) -> Any:
    # ComfyUI's `from server import PromptServer`, for custom-node packs; loaded only when asked for.
    if name == "PromptServer":
        from .prompt_server import PromptServer
        return PromptServer
    if name == "BinaryEventTypes":
        from .prompt_server import BinaryEventTypes
        return BinaryEventTypes
    raise AttributeError(f"module 'server' has no attribute {name!r}")
