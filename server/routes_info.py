"""Read-only information routes: node schemas, model lists, system stats, feature flags."""
from __future__ import annotations

import asyncio
import os
import platform
import sys
from importlib import metadata
from typing import Any

import psutil
from aiohttp import web

from .routing import Routes, json_response
from .security import ApiError
from .state import STATE

routes = Routes("info")


def sdflow_version() -> str:
    try:
        return metadata.version("sdflow")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@routes.get("/object_info", "Schemas of every node type ({class_name: node_info})")
async def object_info(request: web.Request) -> web.Response:
    registry = request.app[STATE].registry
    return json_response(await asyncio.to_thread(registry.object_info))


@routes.get("/object_info/{node_class}", "Schema of one node type, or {} if unknown")
async def object_info_one(request: web.Request) -> web.Response:
    registry = request.app[STATE].registry
    name = request.match_info["node_class"]
    if name not in registry:
        return json_response({})
    return json_response({name: await asyncio.to_thread(registry.node_info, name)})


def _list_files(catalog: Any, folder: str) -> list[str] | None:
    if catalog is None:
        return None
    return catalog.list_files(folder)


@routes.get("/embeddings", "Embedding names, without extension")
async def embeddings(request: web.Request) -> web.Response:
    files = await asyncio.to_thread(_list_files, request.app[STATE].catalog, "embeddings") or []
    return json_response([os.path.splitext(f)[0] for f in files])


@routes.get("/models", "Model folder names")
async def models(request: web.Request) -> web.Response:
    catalog = request.app[STATE].catalog
    return json_response(list(catalog.folder_names()) if catalog is not None else [])


@routes.get("/models/{folder}", "Files in one model folder; 404 for an unknown folder")
async def models_folder(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    files = await asyncio.to_thread(_list_files, request.app[STATE].catalog, folder)
    if files is None:
        raise ApiError(404, f"unknown model folder {folder[:80]!r}", type_="not_found")
    return json_response(files)


def _devices() -> list[dict]:
    vm = psutil.virtual_memory()
    devices = []
    torch = sys.modules.get("torch")  # only report CUDA when torch is already loaded; never import it here
    if torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"name": f"cuda:{i} {torch.cuda.get_device_name(i)}", "type": "cuda", "index": i,
                            "vram_total": total, "vram_free": free,
                            "torch_vram_total": torch.cuda.memory_reserved(i),
                            "torch_vram_free": torch.cuda.memory_reserved(i) - torch.cuda.memory_allocated(i)})
    if not devices:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": vm.total,
                        "vram_free": vm.available, "torch_vram_total": vm.total, "torch_vram_free": vm.available})
    return devices


@routes.get("/system_stats", "System, devices, and sdflow's cache and queue statistics")
async def system_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    vm = psutil.virtual_memory()
    version = sdflow_version()
    cache = getattr(state.executor, "cache", None)
    # The cache's figures are read off the event loop too: a cache (or a remote backend's) may be busy.
    counts, history, cache_stats = await asyncio.to_thread(lambda: (
        state.store.counts(), state.store.history_count(),
        cache.stats() if cache is not None and hasattr(cache, "stats") else {}))
    data = {
        "system": {
            "os": os.name, "platform": platform.platform(), "ram_total": vm.total, "ram_free": vm.available,
            "comfyui_version": version, "sdflow_version": version,
            "required_frontend_version": None, "installed_templates_version": None,
            "required_templates_version": None,
            "python_version": sys.version, "pytorch_version": _dist_version("torch"),
            "embedded_python": False, "argv": sys.argv,
        },
        "devices": _devices(),
        "cache": cache_stats,
        "queue": {**counts, "paused": state.worker.paused, "history": history,
                  "completed_since_start": state.worker.completed},
    }
    return json_response(data)


@routes.get("/features", "Server feature flags")
async def features(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].features)


@routes.get("/extensions", "Frontend extension scripts: the JS files of custom-node packs' WEB_DIRECTORY")
async def extensions(request: web.Request) -> web.Response:
    from .routes_custom_nodes import extension_scripts, loaded_packs
    return json_response(extension_scripts(loaded_packs(request.app[STATE].registry)))
