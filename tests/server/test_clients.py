"""Client libraries people use with ComfyUI, installed from PyPI (pinned in the `test` extra), running their
basic usage unchanged against a real sdflow server with the real SD node set and a tiny checkpoint."""
from __future__ import annotations

import asyncio
import io

import aiohttp
import pytest
from PIL import Image

from .test_ws_sequence import sd_server, txt2img  # noqa: F401  (fixture and prompt shared)

pytestmark = pytest.mark.slow


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


async def test_comfy_api_simplified_gets_the_saved_image_not_previews(sd_server):  # noqa: F811
    simplified = pytest.importorskip("comfy_api_simplified")
    url, _ = sd_server
    api = simplified.ComfyApiWrapper(url)
    prompt = txt2img(11)
    prompt["9"]["_meta"] = {"title": "Save Image"}
    images = await asyncio.to_thread(api.queue_and_wait_images, simplified.ComfyWorkflowWrapper(prompt), "Save Image")
    assert len(images) == 1
    name, data = next(iter(images.items()))
    assert name.startswith("ComfyUI_") and name.endswith(".png"), "the saved file, not 8-byte-stripped previews"
    assert _png_size(data) == (64, 64)


async def test_comfy_api_simplified_with_save_image_websocket(sd_server):  # noqa: F811
    simplified = pytest.importorskip("comfy_api_simplified")
    url, _ = sd_server
    api = simplified.ComfyApiWrapper(url)
    prompt = txt2img(12)
    prompt["9"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]},
                   "_meta": {"title": "Save Image"}}
    images = await asyncio.to_thread(api.queue_and_wait_images, simplified.ComfyWorkflowWrapper(prompt), "Save Image")
    assert list(images) == ["0"] and _png_size(images["0"]) == (64, 64)


async def test_comfyui_utils_submit_and_fetch(sd_server):  # noqa: F811
    comfy = pytest.importorskip("comfyui_utils.comfy")
    url, _ = sd_server
    address = url.removeprefix("http://")

    class Recorder(comfy.Callbacks):
        def __init__(self) -> None:
            self.positions: list = []
            self.progress: list = []
            self.outputs: dict | None = None
            self.cached: bool | None = None

        async def queue_position(self, position):
            self.positions.append(position)

        async def in_progress(self, node_id, progress, total):
            self.progress.append((node_id, progress, total))

        async def completed(self, outputs, cached):
            self.outputs, self.cached = outputs, cached

    api = comfy.ComfyAPI(address)
    rec = Recorder()
    await asyncio.wait_for(api.submit(txt2img(13), rec), 120)
    assert rec.outputs is not None, rec.__dict__
    image = rec.outputs["images"][0]
    assert (3, 4, 4) in rec.progress, rec.progress       # KSampler's last step seen
    fetched: list[bytes] = []

    async def keep(buf):
        fetched.append(buf.read())

    await api.fetch({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}, keep)
    assert _png_size(fetched[0]) == (64, 64)


async def test_comfyui_websocket_images_example_flow(sd_server):  # noqa: F811
    """The protocol of ComfyUI's websockets_api_example_ws_images.py: binary frames that arrive while its
    SaveImageWebsocket node is executing are the images, minus the 8-byte header."""
    import json
    import uuid

    url, session = sd_server
    client_id = str(uuid.uuid4())
    prompt = txt2img(14)
    del prompt["9"]
    prompt["save_image_websocket_node"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    ws = await session.ws_connect(f"{url}/ws?clientId={client_id}")
    async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
        prompt_id = (await r.json())["prompt_id"]
    images, current = [], ""
    while True:
        msg = await ws.receive(timeout=120)
        if msg.type == aiohttp.WSMsgType.TEXT:
            message = json.loads(msg.data)
            if message["type"] == "executing":
                data = message["data"]
                if data["prompt_id"] == prompt_id:
                    if data["node"] is None:
                        break
                    current = data["node"]
        elif current == "save_image_websocket_node":
            images.append(msg.data[8:])
    await ws.close()
    assert len(images) == 1 and _png_size(images[0]) == (64, 64)
