"""One local Ray cluster (2 CPUs, small object store, its own short temp dir) shared by every Ray test,
and a real sdflow server whose queue runs on Ray worker actors of that cluster."""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.config import RuntimeConfig
from engine.registry import Registry
from server.app import create_app
from server.state import STATE, ServerOptions
from tests.server.conftest import Server, free_port

ray = pytest.importorskip("ray")

MB = 1024 * 1024
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="session")
def ray_cluster():
    from server.ray_backend import start_local_ray

    saved = {k: os.environ.get(k) for k in _AUTH_VARS}
    # a short path: Ray's unix sockets live under it and must stay below 107 characters
    temp = tempfile.mkdtemp(prefix="sdflow-ray-", dir="/tmp")
    start_local_ray(num_cpus=2, temp_dir=temp, object_store_memory=100 * MB, data_dir=Path(temp))
    try:
        yield temp
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


async def start_ray_server(tmp_path: Path, registry: Registry, config: RuntimeConfig, *, workers: int = 2,
                           builtin_nodes: bool = False, node_modules: list[str] | None = None,
                           catalog: Any = None) -> tuple[Server, web.AppRunner]:
    from server.ray_backend import RayBackend, RayCluster, WorkerSpec

    spec = WorkerSpec.from_config(config, builtin_nodes=builtin_nodes, node_modules=node_modules)
    cluster = await asyncio.to_thread(RayCluster, spec, workers=workers, start_timeout=120)
    port = free_port()
    options = ServerOptions(port=port, web_root=tmp_path / "no-web", preview_method="latent2rgb")
    app = create_app(config, registry, catalog, options=options,
                     worker_factory=RayBackend.factory(cluster, config, registry))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Server(f"http://127.0.0.1:{port}", port, config, aiohttp.ClientSession(), app), runner


def backend(server: Server):
    return server.app[STATE].worker


async def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
