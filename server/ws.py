"""The websocket hub: `/ws?clientId=`, event routing and binary preview frames (reference §2.3).

Routing follows ComfyUI: events of a prompt go to the socket whose id is the prompt's client_id; a prompt
without a client_id gets no per-node events at all, but its progress, previews and interruption are
broadcast; `status` always goes to everyone.

Every socket has its own outgoing queue drained by its own task, so one slow browser never delays the
others, and frames of one socket keep their order. The worker thread hands events over with
`post_threadsafe`; everything else here runs on the event loop.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger("sdflow.server")

# binary frame types (protocol.BinaryEventTypes)
PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2      # SaveImageWebsocket's frames
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
IMAGE_FORMAT_JPEG = 1
IMAGE_FORMAT_PNG = 2

# events that ComfyUI sends only when the prompt has a client_id
CLIENT_ONLY_EVENTS = frozenset({"execution_start", "execution_cached", "executing", "executed",
                                "execution_success", "execution_error"})
MAX_CLIENT_BACKLOG = 5000        # frames; a client this far behind is disconnected rather than eating memory


@dataclass
class EncodedPreview:
    data: bytes
    mime: str                    # "image/jpeg" | "image/png"
    meta: dict                   # node_id, prompt_id, display_node_id, parent_node_id, real_node_id

    def frame(self, with_metadata: bool) -> bytes:
        if with_metadata:
            meta = json.dumps({**self.meta, "image_type": self.mime}).encode()
            return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + self.data
        fmt = IMAGE_FORMAT_JPEG if self.mime == "image/jpeg" else IMAGE_FORMAT_PNG
        return struct.pack(">II", PREVIEW_IMAGE, fmt) + self.data


def encode_preview(image: Any, data: dict, max_size: int = 512) -> EncodedPreview:
    """JPEG quality 95, scaled down to fit `max_size` (ComfyUI's defaults). Runs in the worker thread."""
    img = image
    if max_size and max(img.size) > max_size:
        img = img.copy()
        img.thumbnail((max_size, max_size))
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    # the engine names them node_id/display_node_id/...; accept the short names (node, display_node) too
    node = data.get("node_id", data.get("node"))
    meta = {
        "node_id": node,
        "prompt_id": data.get("prompt_id"),
        "display_node_id": data.get("display_node_id", data.get("display_node", node)),
        "parent_node_id": data.get("parent_node_id", data.get("parent_node")),
        "real_node_id": data.get("real_node_id", node),
    }
    return EncodedPreview(buf.getvalue(), "image/jpeg", meta)


@dataclass
class Client:
    sid: str
    ws: web.WebSocketResponse
    features: dict = field(default_factory=dict)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    negotiated: bool = False
    extras: bool = False          # asked for sdflow's extra status fields (?extras=sdflow)

    @property
    def wants_metadata(self) -> bool:
        return bool(self.features.get("supports_preview_metadata"))


class Hub:
    def __init__(self, server_features: dict, status: Callable[[], dict], *, previews_for_all: bool = True) -> None:
        self.server_features = server_features
        self.status = status                     # () -> {"exec_info": {...}}
        # ComfyUI's --preview-method: with "none" only clients that announce preview support get step
        # previews (sdflow's editor and ComfyUI's front end do, in their feature_flags)
        self.previews_for_all = previews_for_all
        self.clients: dict[str, Client] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        # (prompt_id, client_id, node, display_node) of the running prompt, for reconnects
        self.current: dict | None = None
        # called on the event loop with the client id of every websocket that connects (a backend that
        # skips events for unwatched prompts starts sending them)
        self.on_connect: list[Callable[[str], None]] = []

    # ---- sending (event loop) -------------------------------------------------------------------

    def _put(self, client: Client, frame: str | bytes) -> None:
        if client.outbox.qsize() >= MAX_CLIENT_BACKLOG:
            log.warning("websocket client %s is too slow; disconnecting it", client.sid)
            asyncio.ensure_future(client.ws.close(code=1008, message=b"too slow"))
            return
        client.outbox.put_nowait(frame)

    def _targets(self, sid: str | None) -> list[Client]:
        if sid is None:
            return list(self.clients.values())
        client = self.clients.get(sid)
        return [client] if client else []

    def has_listener(self, sid: str | None) -> bool:
        """Whether a frame for `sid` (None = broadcast) would reach anyone. Read from the worker thread:
        a dict lookup is atomic, and a stale answer only costs or skips one preview."""
        return bool(self.clients) if sid is None else sid in self.clients

    def wants_previews(self, client: Client) -> bool:
        return self.previews_for_all or client.wants_metadata

    def has_preview_listener(self, sid: str | None) -> bool:
        """Whether a step preview for `sid` (None = broadcast) would reach anyone (read from the worker)."""
        return any(self.wants_previews(c) for c in self._targets(sid))

    def status_frame(self, client: Client, snapshot: dict | None = None, **extra: Any) -> str:
        """ComfyUI's status message; sdflow's fields (paused) only for clients that opted in."""
        status = snapshot if snapshot is not None else self.status()
        if not client.extras:
            status = {**status, "exec_info": {"queue_remaining": status.get("exec_info", {}).get("queue_remaining", 0)}}
        return json.dumps({"type": "status", "data": {"status": status, **extra}})

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        text = json.dumps({"type": event, "data": data}, default=str)
        for client in self._targets(sid):
            self._put(client, text)

    def send_preview(self, preview: EncodedPreview, sid: str | None) -> None:
        plain = meta = None
        for client in self._targets(sid):
            if not self.wants_previews(client):
                continue
            if client.wants_metadata:
                meta = meta or preview.frame(True)
                self._put(client, meta)
            else:
                plain = plain or preview.frame(False)
                self._put(client, plain)

    def send_text(self, node_id: str, text: str, sid: str | None) -> None:
        node = node_id.encode()
        frame = struct.pack(">II", TEXT, len(node)) + node + text.encode()
        for client in self._targets(sid):
            self._put(client, frame)

    def broadcast_status(self, snapshot: dict | None = None) -> None:
        """`snapshot`: the status taken when the queue changed (the worker may be further along by now)."""
        for client in list(self.clients.values()):
            self._put(client, self.status_frame(client, snapshot))

    def send_binary(self, frame: bytes, sid: str | None) -> None:
        for client in self._targets(sid):
            self._put(client, frame)

    def dispatch(self, event: str, data: dict, client_id: str | None, preview: EncodedPreview | None = None) -> None:
        """Route one engine event of a prompt whose owner is `client_id`."""
        if event in ("executing", "execution_start"):
            self._track(event, data, client_id)
        if preview is not None:
            self.send_preview(preview, client_id)
            return
        if client_id is None and event in CLIENT_ONLY_EVENTS:
            return
        self.send(event, data, client_id)

    def _track(self, event: str, data: dict, client_id: str | None) -> None:
        if event == "execution_start":
            self.current = {"prompt_id": data.get("prompt_id"), "client_id": client_id, "node": None,
                            "display_node": None}
        elif self.current is not None and data.get("prompt_id") == self.current["prompt_id"]:
            if data.get("node") is None:
                self.current = None
            else:
                self.current["node"] = data.get("node")
                self.current["display_node"] = data.get("display_node", data.get("node"))

    # ---- from the worker thread -----------------------------------------------------------------

    def post_threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop shutting down
            pass

    # ---- the /ws route --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=1 << 20)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        sid = sid[:200]
        old = self.clients.pop(sid, None)
        if old is not None:   # a reconnect with the same id replaces the old socket
            await old.ws.close(code=1000, message=b"replaced by a new connection")
        client = Client(sid, ws, extras=request.query.get("extras") == "sdflow")
        self.clients[sid] = client
        for hook in list(self.on_connect):
            try:
                hook(sid)
            except Exception:
                log.exception("websocket connect hook failed")
        writer = asyncio.create_task(self._writer(client))
        try:
            self._put(client, self.status_frame(client, sid=sid))
            cur = self.current
            if cur is not None and cur["client_id"] == sid and cur["node"] is not None:
                self._put(client, json.dumps({"type": "executing", "data": {
                    "node": cur["node"], "display_node": cur["display_node"], "prompt_id": cur["prompt_id"]}}))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_text(client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if self.clients.get(sid) is client:
                del self.clients[sid]
            writer.cancel()
        return ws

    def _on_text(self, client: Client, text: str) -> None:
        # Only the first message means anything (feature negotiation); later ones are ignored unparsed.
        if client.negotiated:
            return
        client.negotiated = True
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if isinstance(msg, dict) and msg.get("type") == "feature_flags" and isinstance(msg.get("data"), dict):
            client.features = msg["data"]
            self._put(client, json.dumps({"type": "feature_flags", "data": self.server_features}))

    async def _writer(self, client: Client) -> None:
        try:
            while True:
                frame = await client.outbox.get()
                if client.ws.closed:
                    return
                if isinstance(frame, bytes):
                    await client.ws.send_bytes(frame)
                else:
                    await client.ws.send_str(frame)
        except (ConnectionResetError, RuntimeError, asyncio.CancelledError):
            return

    async def close_all(self) -> None:
        for client in list(self.clients.values()):
            await client.ws.close(code=1001, message=b"server shutting down")
        self.clients.clear()
