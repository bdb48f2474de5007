"""The websocket messages of a txt2img prompt, message by message against ComfyUI's recording
(shared/data/comfyui-ws-sequences.json: first run, warm run with a new seed, fully cached resubmit),
on the real SD node set with a tiny checkpoint through a real server."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.config import RuntimeConfig
from server.app import create_app
from server.state import ServerOptions

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RECORDING = Path(os.environ.get("SDFLOW_SHARED", ROOT.parent / "shared")) / "data" / "comfyui-ws-sequences.json"
if not RECORDING.exists():
    RECORDING = Path("/work/shared/data/comfyui-ws-sequences.json")

pytestmark = pytest.mark.slow


def recorded(run: str) -> list[dict]:
    return json.loads(RECORDING.read_text())["runs"][run]["messages"]


def summary(msg: dict) -> tuple:
    """What must match ComfyUI: the type and the parts of data that do not vary per run."""
    kind, data = msg["type"], msg.get("data") or {}
    if kind == "status":
        return kind, json.dumps(data["status"], sort_keys=True), "sid" in data
    if kind == "progress_state":
        return kind, tuple((n, v["state"], float(v["value"]), float(v["max"])) for n, v in data["nodes"].items())
    if kind == "executing":
        return kind, data.get("node"), data.get("display_node", data.get("node"))
    if kind == "executed":
        keys = sorted(data["output"]) if "output" in data else data["output_keys"]
        return kind, data["node"], data["display_node"], tuple(keys)
    if kind == "execution_cached":
        return kind, tuple(sorted(data["nodes"]))
    if kind == "progress":
        return kind, data["node"], data["value"], data["max"]
    return kind, tuple(sorted(k for k in data if k != "timestamp"))


@pytest.fixture
async def sd_server(tmp_path):
    nodes = pytest.importorskip("nodes")
    from nodes.models.tiny import write_tiny_checkpoint

    config = RuntimeConfig(data_dir=tmp_path / "data")
    config.ensure_dirs()
    write_tiny_checkpoint(config.models_dir / "checkpoints" / "tiny.safetensors", "sd1")
    registry, catalog = nodes.build_registry(config, plugins=False)
    port = free_port()
    app = create_app(config, registry, catalog, options=ServerOptions(port=port))   # --preview-method none
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    session = aiohttp.ClientSession()
    try:
        yield f"http://127.0.0.1:{port}", session
    finally:
        await session.close()
        await runner.cleanup()


def txt2img(seed: int) -> dict:
    prompt = json.loads((ROOT / "workflows" / "txt2img_api.json").read_text())
    assert sorted(prompt) == ["3", "4", "5", "6", "7", "8", "9"]
    prompt["4"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["3"]["inputs"].update(steps=4, seed=seed)
    return prompt


async def run_and_record(url: str, session: aiohttp.ClientSession, prompt: dict, client_id: str) -> list[dict]:
    ws = await session.ws_connect(f"{url}/ws?clientId={client_id}")
    messages: list[dict] = []
    try:
        greeting = await ws.receive(timeout=10)
        messages.append(json.loads(greeting.data))
        async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
            body = await r.json()
            assert r.status == 200, body
        while True:
            msg = await ws.receive(timeout=120)
            if msg.type == aiohttp.WSMsgType.BINARY:
                messages.append({"type": "<binary>"})
                continue
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            messages.append(data)
            if data["type"] == "executing" and data["data"]["node"] is None:
                break
        # ComfyUI sends nothing after executing {node: null}; neither may sdflow
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.5)
    finally:
        await ws.close()
    return messages


def assert_same_sequence(ours: list[dict], theirs: list[dict]) -> None:
    a, b = [summary(m) for m in ours], [summary(m) for m in theirs]
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"message {i} differs:\n sdflow  {x}\n ComfyUI {y}\n sdflow so far: {a[:i + 1]}"
    assert len(a) == len(b), f"sdflow sent {len(a)} messages, ComfyUI {len(b)}: extra {a[len(b):] or b[len(a):]}"


async def test_first_warm_and_cached_runs_match_comfyui(sd_server):
    url, session = sd_server
    first = await run_and_record(url, session, txt2img(1), "first")
    assert_same_sequence(first, recorded("first_mini"))
    warm = await run_and_record(url, session, txt2img(2), "warm")
    assert_same_sequence(warm, recorded("warm_mini"))
    cached = await run_and_record(url, session, txt2img(2), "cached")
    assert_same_sequence(cached, recorded("resubmit_mini"))
    # no previews with --preview-method none for a client that did not announce preview support
    assert not any(m["type"] == "<binary>" for m in first + warm)


async def test_previews_only_for_clients_that_announce_them_and_save_image_websocket(sd_server):
    import io
    import struct

    from PIL import Image

    url, session = sd_server
    prompt = txt2img(5)
    prompt["9"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    ws = await session.ws_connect(f"{url}/ws?clientId=viewer")
    await ws.receive(timeout=10)
    await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    assert json.loads((await ws.receive(timeout=10)).data)["type"] == "feature_flags"
    async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": "viewer"}) as r:
        assert r.status == 200, await r.text()
    frames, texts = [], []
    while True:
        msg = await ws.receive(timeout=120)
        if msg.type == aiohttp.WSMsgType.BINARY:
            frames.append(msg.data)
            continue
        data = json.loads(msg.data)
        texts.append(data)
        if data["type"] == "executing" and data["data"]["node"] is None:
            break
    await ws.close()
    kinds = [struct.unpack(">I", f[:4])[0] for f in frames]
    assert kinds.count(4) >= 1, "a client announcing supports_preview_metadata gets step previews"
    assert kinds[-1] == 2 and kinds.count(2) == 1
    event, fmt = struct.unpack(">II", frames[-1][:8])
    assert (event, fmt) == (2, 2)
    image = Image.open(io.BytesIO(frames[-1][8:]))
    assert image.format == "PNG" and image.size == (64, 64)
    # like ComfyUI's node: no UI output, so no `executed` for it and nothing in history outputs
    assert not any(m["type"] == "executed" for m in texts)
