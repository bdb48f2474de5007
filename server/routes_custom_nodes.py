"""Custom-node packs over HTTP: their import report, and their front-end files (`WEB_DIRECTORY`) served
under `/extensions/<pack>/...` as ComfyUI does."""
from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.paths import UnsafePathError, contained_path

from .routing import Routes, json_response
from .state import STATE

routes = Routes("custom_nodes")


def loaded_packs(registry: Any) -> list[Any]:
    return list(getattr(registry, "custom_packs", None) or [])


def extension_scripts(packs: list[Any]) -> list[str]:
    """`/extensions/<pack>/<file>.js` for every JS file under each loaded pack's WEB_DIRECTORY."""
    found = []
    for pack in packs:
        web_dir = getattr(pack, "web_directory", None)
        if not pack.ok or web_dir is None:
            continue
        for script in sorted(Path(web_dir).rglob("*.js")):
            found.append(f"/extensions/{pack.name}/{script.relative_to(web_dir).as_posix()}")
    return found


@routes.get("/custom_nodes", "The custom-node packs found at start-up: nodes, import time, or the error")
async def custom_nodes(request: web.Request) -> web.Response:
    return json_response([p.summary() for p in loaded_packs(request.app[STATE].registry)])


@routes.get("/extensions/{pack}/{path:.+}", "A file of a custom-node pack's WEB_DIRECTORY")
async def extension_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["pack"]
    pack = next((p for p in loaded_packs(request.app[STATE].registry)
                 if p.name == name and p.ok and p.web_directory is not None), None)
    if pack is None:
        raise web.HTTPNotFound(text=f"no custom-node pack {name!r} with a web directory")
    try:
        path = contained_path(pack.web_directory, request.match_info["path"])
    except UnsafePathError:
        raise web.HTTPNotFound() from None
    if not path.is_file():
        raise web.HTTPNotFound()
    kind = "application/javascript" if path.suffix == ".js" else mimetypes.guess_type(path.name)[0]
    return web.FileResponse(path, headers={"Content-Type": kind or "application/octet-stream"})


def bind_prompt_server(app: web.Application, registry: Any, hub: Any) -> None:
    """Give packs' `PromptServer.instance` this app and mount the routes they added (only with packs)."""
    if not loaded_packs(registry):
        return
    from .prompt_server import PromptServer
    PromptServer.instance.bind(app, hub)
    PromptServer.instance.mount_routes(app)
