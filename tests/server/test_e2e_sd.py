"""One end-to-end run of the real SD node set (tiny random-weight checkpoint) through the real server:
POST /prompt -> websocket events with previews -> /history -> /view of a PNG that carries the prompt."""
from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from engine.config import RuntimeConfig
from engine.png_metadata import workflow_from_png
from server.app import create_app
from server.state import ServerOptions

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
async def test_txt2img_through_the_server(tmp_path):
    nodes = pytest.importorskip("nodes")
    from nodes.models.tiny import write_demo_checkpoint

    config = RuntimeConfig(data_dir=tmp_path / "data")
    config.ensure_dirs()
    write_demo_checkpoint(config.models_dir)
    registry, catalog = nodes.build_registry(config)
    prompt = json.loads((ROOT / "workflows" / "txt2img_api.json").read_text())
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"]["steps"] = 3

    port = free_port()
    app = create_app(config, registry, catalog, options=ServerOptions(port=port))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/models/checkpoints") as r:
                assert "sdflow-demo-RANDOM-WEIGHTS-sd15.safetensors" in await r.json()
            ws = await s.ws_connect(url + "/ws?clientId=e2e")
            await ws.receive(timeout=10)
            async with s.post(url + "/prompt", json={"prompt": prompt, "client_id": "e2e",
                                                     "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}},
                                                     }) as r:
                body = await r.json()
                assert r.status == 200, body
            pid = body["prompt_id"]
            types, binary = [], []
            while True:
                msg = await ws.receive(timeout=300)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    binary.append(msg.data)
                    continue
                m = json.loads(msg.data)
                types.append(m["type"])
                if m["type"] == "execution_error":
                    raise AssertionError(m["data"])
                if m["type"] == "executing" and m["data"]["node"] is None:
                    break
            assert "execution_success" in types and types.count("progress") >= 3
            if binary:   # latent previews (the default preview method): type 1 JPEG frames
                assert struct.unpack(">II", binary[0][:8]) == (1, 1)
            async with s.get(url + f"/history/{pid}") as r:
                entry = (await r.json())[pid]
            image = entry["outputs"]["9"]["images"][0]
            async with s.get(url + "/view", params={"filename": image["filename"], "type": image["type"],
                                                    "subfolder": image["subfolder"]}) as r:
                assert r.status == 200 and r.content_type == "image/png"
                data = await r.read()
            assert Image.open(io.BytesIO(data)).size == (64, 64)
            ui, api = workflow_from_png(data)
            assert api is not None and api["3"]["class_type"] == "KSampler"
            await ws.close()
    finally:
        await runner.cleanup()
