"""ComfyUI's `server.PromptServer` for custom-node packs: `PromptServer.instance` with `routes` (an aiohttp
RouteTableDef packs add handlers to at import), `send_sync`, `client_id`, `app` and `loop`.

The instance exists from the first access (packs touch it while they import, before any app exists); the
app binds it at creation, mounts the routes packs added, and from then on `send_sync` reaches the websocket
clients.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


class BinaryEventTypes:
    """ComfyUI's `server.BinaryEventTypes`: the type codes of binary websocket frames (sdflow's own in ws.py)."""
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class PromptServer:
    instance: PromptServer

    def __init__(self) -> None:
        self.routes = web.RouteTableDef()
        self.app: web.Application | None = None
        self.number = 0
        self.supports = ["custom_nodes_from_web"]
        self._hub: Any = None
        self._mounted = 0

    def _running(self, key: str) -> str | None:
        current = getattr(self._hub, "current", None)   # the hub tracks the running prompt's owner
        return current.get(key) if current else None

    @property
    def client_id(self) -> str | None:
        """The websocket client id of the prompt running now (what packs address `send_sync` to)."""
        from engine.progress import current
        ctx = current()      # inside a node: its own prompt's client, exact even while the hub lags behind
        if ctx is not None and ctx.extra_data is not None:
            sid = ctx.extra_data.get("client_id")
            return sid if isinstance(sid, str) else None
        return self._running("client_id")

    @property
    def last_node_id(self) -> str | None:
        return self._running("node")

    @property
    def last_prompt_id(self) -> str | None:
        return self._running("prompt_id")

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return getattr(self._hub, "loop", None)

    def bind(self, app: web.Application, hub: Any) -> None:
        self.app, self._hub = app, hub

    def mount_routes(self, app: web.Application) -> int:
        """Add the pack routes registered so far to `app` (before it starts); their count."""
        added = 0
        for route in list(self.routes):
            if not isinstance(route, web.RouteDef):
                continue
            try:
                app.router.add_route(route.method, route.path, route.handler, **route.kwargs)
                added += 1
            except (RuntimeError, ValueError) as exc:   # a clash with one of sdflow's routes, or a bad path
                log.error("custom nodes: route %s %s not added: %s", route.method, route.path, exc)
        return added

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        hub = self._hub
        if hub is None:
            return
        hub.post_threadsafe(hub.send, event, data, sid)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        hub = self._hub
        if hub is not None:
            hub.post_threadsafe(hub.send_text, node_id, text, sid)

    def add_on_prompt_handler(self, handler: Any) -> None:
        log.warning("custom nodes: on-prompt handlers are not supported by sdflow; %r ignored", handler)


PromptServer.instance = PromptServer()
