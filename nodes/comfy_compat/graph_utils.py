"""ComfyUI's `comfy_execution.graph_utils` and `comfy_execution.graph` (node expansion, blocking)."""
from __future__ import annotations

from engine.expansion import ExecutionBlocker, GraphBuilder, Node, is_link

__all__ = ["ExecutionBlocker", "GraphBuilder", "Node", "is_link"]
