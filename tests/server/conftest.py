"""A real sdflow server on 127.0.0.1 (free port, in-process AppRunner/TCPSite) with the test nodes, plus
helpers for its HTTP API and websocket."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.config import RuntimeConfig
from engine.registry import Registry
from server.app import create_app
from server.state import ServerOptions

from . import plugin_nodes

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCatalog:
    """A minimal model catalog (the real one lives in nodes/); duck-typed as create_app expects."""

    def __init__(self, files: dict[str, list[str]]) -> None:
        self.files = files

    def folder_names(self) -> list[str]:
        return list(self.files)

    def list_files(self, folder: str) -> list[str] | None:
        return self.files.get(folder)


@dataclass
class WS:
    ws: aiohttp.ClientWebSocketResponse
    sid: str
    events: list[tuple[str, Any]] = field(default_factory=list)   # ("json", msg) | ("binary", bytes)

    async def next_json(self, timeout: float = 10.0) -> dict:
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.events.append(("json", data))
                return data
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.events.append(("binary", msg.data))
                continue
            raise AssertionError(f"websocket closed: {msg}")

    async def until_done(self, prompt_id: str, timeout: float = 30.0) -> list[tuple[str, Any]]:
        """Collect frames until `executing {node: null}` for `prompt_id`; returns the frames of this wait."""
        start = len(self.events)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no completion for {prompt_id}; got {self.events[start:]}")
            msg = await self.next_json(remaining)
            if (msg["type"] == "executing" and msg["data"].get("node") is None
                    and msg["data"].get("prompt_id") == prompt_id):
                return self.events[start:]

    async def close(self) -> None:
        await self.ws.close()


@dataclass
class Server:
    url: str
    port: int
    config: RuntimeConfig
    session: aiohttp.ClientSession
    app: web.Application
    token: str | None = None

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.get(self.url + path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    async def post(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.session.post(self.url + path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    async def get_json(self, path: str) -> Any:
        async with await self.get(path) as r:
            assert r.status == 200, (path, r.status, await r.text())
            return await r.json()

    async def queue_prompt(self, prompt: dict, client_id: str | None = None, **extra: Any) -> dict:
        body = {"prompt": prompt, **extra}
        if client_id:
            body["client_id"] = client_id
        async with await self.post("/prompt", json=body) as r:
            data = await r.json()
            assert r.status == 200, data
            return data

    async def connect(self, client_id: str | None = None, features: dict | None = None,
                      extras: bool = False) -> WS:
        """A websocket client; `extras` opts in to sdflow's status fields (paused), as sdflow's editor does."""
        client_id = client_id or uuid.uuid4().hex
        q = (f"?clientId={client_id}" + (f"&token={self.token}" if self.token else "")
             + ("&extras=sdflow" if extras else ""))
        ws = await self.session.ws_connect(self.url + "/ws" + q)
        first = json.loads((await ws.receive(timeout=10)).data)
        assert first["type"] == "status" and first["data"]["sid"] == client_id, first
        conn = WS(ws, client_id, [("json", first)])
        if features is not None:
            await ws.send_json({"type": "feature_flags", "data": features})
            reply = await conn.next_json()
            assert reply["type"] == "feature_flags", reply
        return conn

    async def wait_history(self, prompt_id: str, timeout: float = 30.0) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            data = await self.get_json(f"/history/{prompt_id}")
            if prompt_id in data:
                return data[prompt_id]
            await asyncio.sleep(0.05)
        raise AssertionError(f"{prompt_id} never reached history")


async def start_server(tmp_path: Path, *, token: str | None = None, allowed_origins: list[str] | None = None,
                       max_upload_mb: int = 100, web_root: Path | None = None,
                       preview_method: str = "latent2rgb") -> tuple[Server, web.AppRunner]:
    config = RuntimeConfig(data_dir=tmp_path / "data")
    config.ensure_dirs()
    os.environ["SDFLOW_TEST_INPUT_DIR"] = str(config.input_dir)
    os.environ["SDFLOW_TEST_OUTPUT_DIR"] = str(config.output_dir)
    registry = Registry.from_nodes(plugin_nodes)
    catalog = FakeCatalog({"checkpoints": ["tiny.safetensors"], "embeddings": ["emb1.pt", "sub/emb2.safetensors"]})
    port = free_port()
    options = ServerOptions(host="127.0.0.1", port=port, auth_token=token, allowed_origins=allowed_origins or [],
                            max_upload_bytes=max_upload_mb * 1024 * 1024,
                            web_root=web_root or tmp_path / "no-web-dist", preview_method=preview_method)
    app = create_app(config, registry, catalog, options=options)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    session = aiohttp.ClientSession()
    return Server(f"http://127.0.0.1:{port}", port, config, session, app, token), runner


@pytest.fixture
async def server(tmp_path: Path):
    srv, runner = await start_server(tmp_path)
    try:
        yield srv
    finally:
        await srv.session.close()
        await runner.cleanup()


def chain(value: int = 1, steps: int = 0, delay: float = 0.0, out: str = "TestShow") -> dict:
    """Const -> (Slow) -> Add(+10) -> output."""
    prompt: dict = {"1": {"class_type": "TestConst", "inputs": {"value": value}}}
    src = ["1", 0]
    if steps:
        prompt["2"] = {"class_type": "TestSlow", "inputs": {"value": src, "steps": steps, "delay": delay}}
        src = ["2", 0]
    prompt["3"] = {"class_type": "TestAdd", "inputs": {"a": src, "b": 10}}
    prompt["4"] = {"class_type": out, "inputs": {"value": ["3", 0]}}
    if out == "TestSaveImage":
        prompt["4"]["inputs"]["filename_prefix"] = "test"
    return prompt
