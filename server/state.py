"""What the route handlers share: config, registry, catalog, store, hub and worker, kept on the app."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine.config import RuntimeConfig
from engine.registry import Registry
from engine.store import Store

if TYPE_CHECKING:
    from .worker import Worker
    from .ws import Hub

DEFAULT_MAX_UPLOAD_MB = 100


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8188
    auth_token: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    web_root: Path | None = None            # the built editor; default <repo>/web/dist
    preview_size: int = 512
    db_path: Path | None = None             # default <data_dir>/sdflow.db
    # ComfyUI's --preview-method: "none" sends step previews only to clients that announce support for them
    preview_method: str = "none"


@dataclass
class AppState:
    config: RuntimeConfig
    registry: Registry
    catalog: Any
    options: ServerOptions
    store: Store
    hub: "Hub"
    worker: "Worker"
    executor: Any
    started_at: float = 0.0

    def exec_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.store.queue_remaining(), "paused": self.worker.paused}}

    @property
    def features(self) -> dict:
        return server_features(self.options)


def server_features(options: ServerOptions) -> dict:
    """The feature flags `/features` and the websocket negotiation answer with."""
    return {"supports_preview_metadata": True, "max_upload_size": options.max_upload_bytes}


STATE = web.AppKey("sdflow_state", AppState)
