"""The aiohttp application: `create_app(config, registry, catalog)` wires store, hub, worker and routes.

It does not import `nodes`: the CLI (the composition root) builds the SD registry and catalog and passes
them in, and tests pass a registry of small test nodes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.config import RuntimeConfig
from engine.registry import Registry
from engine.store import Store

from . import files, routes_comfy_extras, routes_info, routes_prompt, routes_userdata, routes_workflows
from .openapi import build_openapi
from .routing import API_PREFIX, RouteDoc, Routes, json_response
from .security import OriginPolicy, auth_middleware, error_middleware, host_origin_middleware, is_loopback_bind
from .state import STATE, AppState, ServerOptions, server_features
from .static import add_static_routes, is_public
from .worker import Worker
from .ws import Hub

log = logging.getLogger("sdflow.server")

LOCK = web.AppKey("sdflow_data_dir_lock", object)
ROUTE_TABLES: tuple[Routes, ...] = (routes_prompt.routes, routes_info.routes, files.routes, routes_workflows.routes,
                                    routes_userdata.routes, routes_comfy_extras.routes)


def create_app(config: RuntimeConfig, registry: Registry, catalog: Any = None, *,
               options: ServerOptions | None = None, executor: Any = None) -> web.Application:
    options = options or ServerOptions()
    config.ensure_dirs()
    if executor is None:
        from engine.executor import Executor
        executor = Executor(registry, config=config)
    store = Store(options.db_path or (config.data_dir / "sdflow.db"))

    policy = OriginPolicy(options.allowed_origins, loopback_only=is_loopback_bind(options.host))
    app = web.Application(
        client_max_size=options.max_upload_bytes,
        middlewares=[error_middleware, host_origin_middleware(policy), auth_middleware(options.auth_token, is_public)],
    )

    state_box: dict[str, AppState] = {}
    hub = Hub(server_features(options),
              status=lambda: state_box["state"].exec_info(), previews_for_all=options.preview_method != "none")
    worker = Worker(store, executor, hub, preview_size=options.preview_size,
                    on_queue_change=lambda: hub.post_threadsafe(hub.broadcast_status,
                                                                state_box["state"].exec_info()))
    state = AppState(config=config, registry=registry, catalog=catalog, options=options, store=store,
                     hub=hub, worker=worker, executor=executor, started_at=time.time())
    state_box["state"] = state
    app[STATE] = state

    for table in ROUTE_TABLES:
        table.add_to(app)
    for prefix in ("", API_PREFIX):
        app.router.add_get(prefix + "/ws", hub.handle)
    openapi_doc = build_openapi(ROUTE_TABLES + (_openapi_routes(),), routes_info.sdflow_version())

    async def openapi(request: web.Request) -> web.Response:
        return json_response(openapi_doc)

    for prefix in ("", API_PREFIX):
        app.router.add_get(prefix + "/openapi.json", openapi)
    add_static_routes(app, options.web_root)

    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


def _openapi_routes() -> Routes:
    """The document's own entry (its handler is registered separately, once the document exists)."""
    table = Routes("meta")
    table.docs.append(RouteDoc("GET", "/openapi.json", _openapi_placeholder, "This document", "meta"))
    return table


async def _openapi_placeholder(request: web.Request) -> web.Response:
    return web.Response()


class DataDirBusy(RuntimeError):
    """Another sdflow server already owns this data directory's queue."""


def _lock_data_dir(db_path: Path) -> Any:
    """Hold an exclusive lock next to the database for the server's lifetime: a second server on the same
    data dir would otherwise mark the first one's running prompt as failed and run prompts twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; run one server per data dir
        return None
    handle = open(db_path.with_name(db_path.name + ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataDirBusy(f"another sdflow server is using {db_path.parent} (lock {handle.name})") from None
    return handle


async def _startup(app: web.Application) -> None:
    state = app[STATE]
    app[LOCK] = _lock_data_dir(state.store.path)
    state.hub.loop = asyncio.get_running_loop()
    failed = state.store.recover()
    if failed:
        log.warning("%d prompt(s) were running when the server last stopped; marked failed: %s",
                    len(failed), ", ".join(failed))
    state.worker.start()


async def _shutdown(app: web.Application) -> None:
    await app[STATE].hub.close_all()


async def _cleanup(app: web.Application) -> None:
    state = app[STATE]
    if state.worker.alive:
        await asyncio.to_thread(state.worker.stop)
    state.store.close()
    lock = app.get(LOCK)
    if lock is not None:
        lock.close()
