"""Client libraries people use with ComfyUI, installed from PyPI (pinned in the `test` extra), running their
basic usage unchanged against a real sdflow server with the real SD node set and a tiny checkpoint."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

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


def _post_like_urllib(url: str, body: dict) -> dict:
    """ComfyUI's script examples post the JSON with plain urllib: no Content-Type header of their own, so urllib
    sends application/x-www-form-urlencoded and the server must read the body as JSON all the same."""
    import json
    import urllib.request

    req = urllib.request.Request(url + "/prompt", data=json.dumps(body).encode("utf-8"))
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read())


async def test_comfyui_basic_api_example_sequence(sd_server):  # noqa: F811
    """basic_api_example.py: load an API prompt, change the text and the seed, POST {"prompt": ...} and nothing
    else (no client_id, no websocket). The queued prompt must run to a saved image."""
    url, session = sd_server
    prompt = txt2img(21)
    prompt["6"]["inputs"]["text"] = "masterpiece best quality man"
    prompt["3"]["inputs"]["seed"] = 5
    answer = await asyncio.to_thread(_post_like_urllib, url, {"prompt": prompt})
    prompt_id = answer["prompt_id"]
    assert answer.get("node_errors") == {}, answer

    async def history() -> dict:
        async with session.get(f"{url}/history/{prompt_id}") as r:
            assert r.status == 200
            return await r.json()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    entry = (await history()).get(prompt_id)
    while entry is None or not entry.get("status", {}).get("completed"):
        assert loop.time() < deadline, f"prompt {prompt_id} did not finish: {entry}"
        await asyncio.sleep(0.05)   # polling the state the example's user would look at, with a deadline
        entry = (await history()).get(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["9"]["images"][0]
    async with session.get(f"{url}/view", params=image) as r:
        assert r.status == 200
        assert _png_size(await r.read()) == (64, 64)


async def test_comfyui_websockets_api_example_sequence(sd_server):  # noqa: F811
    """websockets_api_example.py, message by message: open /ws?clientId=<uuid>, POST prompt + client_id + a
    client-chosen prompt_id (urllib, no Content-Type), read frames until `executing` with node None for that
    prompt_id (binary frames are skipped), then GET /history/<prompt_id> and fetch every image of every output
    node through /view?filename&subfolder&type."""
    import json
    import urllib.parse
    import uuid

    url, session = sd_server
    client_id, prompt_id = str(uuid.uuid4()), str(uuid.uuid4())
    prompt = txt2img(22)
    prompt["6"]["inputs"]["text"] = "masterpiece best quality man"
    ws = await session.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}")
    answer = await asyncio.to_thread(
        _post_like_urllib, url, {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id})
    assert answer["prompt_id"] == prompt_id, "the server must keep the prompt_id the client chose"
    seen: list[str] = []
    while True:
        msg = await ws.receive(timeout=120)
        if msg.type == aiohttp.WSMsgType.BINARY:
            continue                      # previews: the example ignores them
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        message = json.loads(msg.data)
        seen.append(message["type"])
        assert message["type"] != "execution_error", message
        if message["type"] == "executing":
            data = message["data"]
            if data["node"] is None and data["prompt_id"] == prompt_id:
                break
    await ws.close()
    assert "execution_start" in seen and "executed" in seen, seen
    async with session.get(f"{url}/history/{prompt_id}") as r:
        history = (await r.json())[prompt_id]
    output_images: dict[str, list[bytes]] = {}
    for node_id, node_output in history["outputs"].items():
        for image in node_output.get("images", []):
            query = urllib.parse.urlencode(
                {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
            async with session.get(f"{url}/view?{query}") as r:
                assert r.status == 200
                output_images.setdefault(node_id, []).append(await r.read())
    assert list(output_images) == ["9"] and len(output_images["9"]) == 1
    assert _png_size(output_images["9"][0]) == (64, 64)


async def test_comfyapi_manager_basic_example(sd_server, tmp_path):  # noqa: F811
    """comfyapi's README flow: set_base_url, load_workflow, edit_workflow, submit_workflow, wait_for_finish
    (it polls /history until a SaveImage output appears), download_output from the /view URL it builds."""
    import json

    comfyapi = pytest.importorskip("comfyapi")
    url, _ = sd_server
    workflow = tmp_path / "workflow_api.json"
    workflow.write_text(json.dumps(txt2img(31)))

    def run() -> tuple[str, str]:
        manager = comfyapi.ComfyAPIManager()
        manager.set_base_url(url)
        manager.load_workflow(str(workflow))
        manager.edit_workflow(["6", "inputs", "text"], "a cat in a hat")
        manager.edit_workflow(["3", "inputs", "seed"], 7)
        prompt_id = manager.submit_workflow()
        filename, output_url = manager.wait_for_finish(prompt_id, poll_interval=0.2, max_wait_time=120)
        return filename, manager.download_output(output_url, save_path=str(tmp_path / "out"))

    filename, saved = await asyncio.to_thread(run)
    assert filename.startswith("ComfyUI_") and filename.endswith(".png")
    assert _png_size((tmp_path / "out" / filename).read_bytes()) == (64, 64), saved


async def test_comfyui_workflow_client_generate(sd_server, tmp_path):  # noqa: F811
    """comfyui-workflow-client (module comfyuiclient): ComfyUIClient(server, workflow file), set_data by node
    title or class, generate([output node]) -> PIL images read back through /history and /view."""
    import json

    client_mod = pytest.importorskip("comfyuiclient")
    url, _ = sd_server
    workflow = tmp_path / "workflow_api.json"
    workflow.write_text(json.dumps(txt2img(32)))

    def run() -> dict:
        client = client_mod.ComfyUIClient(url.removeprefix("http://"), str(workflow))
        client.connect()
        try:
            client.set_data(key="KSampler", seed=12345)
            return client.generate(["SaveImage"])
        finally:
            client.close()

    results = await asyncio.to_thread(run)
    assert list(results) == ["SaveImage"], results
    assert results["SaveImage"].format == "PNG" and results["SaveImage"].size == (64, 64)


COMFY_SCRIPT_REMOTE = """
import io, sys
from comfy_script.runtime import load, Workflow
load(sys.argv[1])
from comfy_script.runtime.nodes import (CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler,
                                        VAEDecode, SaveImage)
with Workflow(wait=True):
    model, clip, vae = CheckpointLoaderSimple('tiny.safetensors')
    positive = CLIPTextEncode('beautiful scenery nature glass bottle landscape', clip)
    negative = CLIPTextEncode('text, watermark', clip)
    latent = EmptyLatentImage(64, 64, 1)
    latent = KSampler(model, 41, 4, 8, 'euler', 'normal', positive, negative, latent, 1)
    saved = SaveImage(VAEDecode(latent, vae), 'ComfyUI')
images = saved.wait()
buf = io.BytesIO()
images[0].save(buf, format='PNG')
open(sys.argv[2], 'wb').write(buf.getvalue())
"""


async def test_comfy_script_remote_mode(sd_server, tmp_path):  # noqa: F811
    """ComfyScript's remote runtime: load(<server url>) builds typed node functions from /object_info, the
    `with Workflow()` block queues the graph, `.wait()` on SaveImage's result fetches the images via /view.
    Run in its own interpreter: load() keeps module-global state and runs its own event loops."""
    import sys

    pytest.importorskip("comfy_script.runtime")
    url, _ = sd_server
    script, out = tmp_path / "remote.py", tmp_path / "out.png"
    script.write_text(COMFY_SCRIPT_REMOTE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url + "/", str(out), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    log, _ = await asyncio.wait_for(proc.communicate(), 180)
    text = log.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Failed" not in text and "Error" not in text, text
    assert _png_size(out.read_bytes()) == (64, 64)


async def test_comfy_cli_run_workflow(sd_server, tmp_path):  # noqa: F811
    """comfy-cli's `comfy run --workflow <api json> --host --port --wait`: it reads /object_info for its
    preflight, posts the prompt, follows the websocket to the end and reports the /view URLs of the outputs
    (as one JSON envelope when stdout is not a terminal)."""
    import json
    import os
    import sys
    from urllib.parse import urlsplit

    pytest.importorskip("comfy_cli")
    url, session = sd_server
    port = urlsplit(url).port
    workflow = tmp_path / "workflow_api.json"
    workflow.write_text(json.dumps(txt2img(51)))
    home = tmp_path / "home"
    home.mkdir()
    # its config and job journal go under $HOME; DO_NOT_TRACK keeps its telemetry off (there is no network)
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfy_cli", "--skip-prompt", "run", "--workflow", str(workflow),
        "--host", "127.0.0.1", "--port", str(port), "--wait", cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, (out.decode(errors="replace"), err.decode(errors="replace"))
    envelope = json.loads(out.decode().strip().splitlines()[-1])
    assert envelope["ok"] is True and envelope["error"] is None, envelope
    assert envelope["data"]["status"] == "completed", envelope
    [view_url] = envelope["data"]["outputs_by_node"]["9"]
    async with session.get(view_url) as r:
        assert r.status == 200
        assert _png_size(await r.read()) == (64, 64)


COMFY_CATAPULT_EXAMPLE = r'''
import asyncio, json, sys
from pathlib import Path
from anyio import Path as AsyncPath   # the library's file API takes anyio paths
from comfy_catapult.api_client import ComfyAPIClient
from comfy_catapult.catapult import ComfyCatapult
from comfy_catapult.comfy_schema import APIHistoryEntry, APIWorkflow, ComfyUIPathTriplet
from comfy_catapult.remote_file_api_comfy import ComfySchemeRemoteFileAPI

async def main(url, workflow_path, out):
    workflow = json.loads(Path(workflow_path).read_text())
    APIWorkflow.model_validate(workflow)      # the library's own schema of an API-format workflow
    async with ComfyAPIClient(comfy_api_url=url) as client:
        async with ComfyCatapult(comfy_client=client, debug_path=None) as catapult:
            remote = ComfySchemeRemoteFileAPI(comfy_api_urls=[url], overwrite=True)
            status, future = await catapult.Catapult(job_id="sdflow-catapult", prepared_workflow=workflow,
                                                     important=["9"], use_future_api=True)
            while not future.done():
                status, _ = await catapult.GetStatus(job_id="sdflow-catapult")
                await asyncio.sleep(0.1)
            history = APIHistoryEntry.model_validate(await future)
            image = history.outputs["9"].root["images"][0]
            triplet = ComfyUIPathTriplet(type=image["type"], subfolder=image["subfolder"], filename=image["filename"])
            await remote.DownloadTriplet(untrusted_comfy_api_url=url, untrusted_src_triplet=triplet,
                                         dst_path=AsyncPath(out))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
'''


async def test_comfy_catapult_example(sd_server, tmp_path):  # noqa: F811
    """comfy-catapult's example flow (Catapult(..., use_future_api=True), poll GetStatus, await the history,
    DownloadTriplet of the SaveImage output). It pins websockets<13 and older attrs/rich/aiofiles than sdflow's,
    so `make setup` installs it with its own locked dependencies (requirements/comfy-catapult.txt) into
    .venv/extras/comfy-catapult, and the example runs in its own interpreter with that folder first on the path."""
    import json
    import os
    import sys

    target = Path(sys.prefix) / "extras" / "comfy-catapult"
    if not (target / "comfy_catapult").is_dir():
        pytest.skip(f"comfy-catapult is not installed in {target} (make setup installs it)")
    url, _ = sd_server
    script, workflow, out = tmp_path / "catapult.py", tmp_path / "workflow_api.json", tmp_path / "out.png"
    script.write_text(COMFY_CATAPULT_EXAMPLE)
    workflow.write_text(json.dumps(txt2img(61)))
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url + "/", str(workflow), str(out), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    log, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, log.decode(errors="replace")
    assert _png_size(out.read_bytes()) == (64, 64)
