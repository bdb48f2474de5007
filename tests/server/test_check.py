"""`sdflow check WORKFLOW` and `POST /check`: missing node classes and model files, listed before running."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.config import RuntimeConfig
from server.app import create_app
from server.state import ServerOptions

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "engine" / "data"


def default_graph_with_extras() -> dict:
    """ComfyUI's default graph plus a node class sdflow lacks and a second loader (TripleCLIPLoader,
    SD3's, also a class sdflow lacks) whose file is missing too."""
    ui = json.loads((DATA / "default_ui.json").read_text())
    ui["nodes"] += [
        {"id": 20, "type": "ImpactWildcardProcessor", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": {"wildcard_text": "a __color__ cat"}},
        {"id": 21, "type": "TripleCLIPLoader", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": {"clip_name1": "t5xxl_fp16.safetensors"}},
        {"id": 22, "type": "ImpactWildcardProcessor", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": {"wildcard_text": "x"}},
    ]
    return ui


def sdflow(data: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "server", args[0], "--data-dir", str(data), *args[1:]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_check_lists_missing_classes_and_models_with_their_folders(tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(default_graph_with_extras()))
    data = tmp_path / "data"
    r = sdflow(data, "check", str(wf))
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stderr
    assert "missing node classes (2):" in out
    assert "ImpactWildcardProcessor  (node 20, 22)" in out and "TripleCLIPLoader  (node 21)" in out
    assert "missing model files (2):" in out
    ckpt_dir = (data / "models" / "checkpoints").resolve()
    assert (f"checkpoints/v1-5-pruned-emaonly.safetensors  (node 4 CheckpointLoaderSimple.ckpt_name); "
            f"put it in {ckpt_dir}") in out
    assert "text_encoders/t5xxl_fp16.safetensors  (node 21 TripleCLIPLoader.clip_name1)" in out

    r = sdflow(data, "check", str(wf), "--json")
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["node_count"] == 10
    assert {m["class_type"]: m["node_ids"] for m in report["missing_nodes"]} == {
        "ImpactWildcardProcessor": ["20", "22"], "TripleCLIPLoader": ["21"]}
    ckpt = next(m for m in report["missing_models"] if m["folder"] == "checkpoints")
    assert ckpt["paths"][0] == str(ckpt_dir)


def test_cli_check_passes_once_the_files_are_in_place(tmp_path):
    ui = json.loads((DATA / "default_ui.json").read_text())
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(ui))
    data = tmp_path / "data"
    (data / "models" / "checkpoints").mkdir(parents=True)
    (data / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"\0" * 8)
    r = sdflow(data, "check", str(wf))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: 7 nodes")


def test_cli_check_refuses_an_unreadable_workflow_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = sdflow(tmp_path / "data", "check", str(bad))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "bad.json" in r.stderr


@pytest.fixture
async def sd_server(tmp_path):
    nodes = pytest.importorskip("nodes")
    config = RuntimeConfig(data_dir=tmp_path / "data")
    config.ensure_dirs()
    registry, catalog = nodes.build_registry(config)
    port = free_port()
    app = create_app(config, registry, catalog, options=ServerOptions(port=port))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}", config
    finally:
        await runner.cleanup()


async def test_post_check_reports_ui_and_api_workflows(sd_server):
    session, url, config = sd_server
    async with session.post(url + "/check", json={"prompt": default_graph_with_extras()}) as r:
        assert r.status == 200
        report = await r.json()
    assert report["ok"] is False
    assert sorted(m["class_type"] for m in report["missing_nodes"]) == ["ImpactWildcardProcessor", "TripleCLIPLoader"]
    assert {(m["folder"], m["name"]) for m in report["missing_models"]} == {
        ("checkpoints", "v1-5-pruned-emaonly.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors")}
    assert report["missing_models"][0]["nodes"] == [
        {"node_id": "4", "class_type": "CheckpointLoaderSimple", "input": "ckpt_name"}]

    # an API prompt posted as the body itself, under /api too; a present file is not listed
    api = json.loads((DATA / "default_api.json").read_text())
    (config.models_dir / "checkpoints" / "v1-5-pruned-emaonly.safetensors").write_bytes(b"\0")
    async with session.post(url + "/api/check", json=api) as r:
        assert r.status == 200
        assert await r.json() == {"ok": True, "node_count": 7, "missing_nodes": [], "missing_models": []}

    # an unsafe model name is reported missing, never looked up outside the folder
    hostile = copy.deepcopy(api)
    hostile["4"]["inputs"]["ckpt_name"] = "../../etc/passwd"
    async with session.post(url + "/check", json={"prompt": hostile}) as r:
        report = await r.json()
    assert [m["name"] for m in report["missing_models"]] == ["../../etc/passwd"]


async def test_post_check_rejects_what_is_not_a_workflow(sd_server):
    session, url, _ = sd_server
    for body in ({"prompt": [1, 2]}, {"hello": "world"}):
        async with session.post(url + "/check", json=body) as r:
            assert r.status == 400
            assert "API-format prompt or a UI-format workflow" in (await r.json())["error"]["message"]
    async with session.post(url + "/check", data=b"{oops") as r:
        assert r.status == 400
    async with session.get(url + "/object_info/KSampler") as r:
        assert r.status == 200  # the server keeps serving
