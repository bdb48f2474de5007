"""ComfyUI's user-data routes (/users, /settings, /userdata) and the other routes its front end calls,
against a real server: shapes and status codes as ComfyUI answers them, containment, size limits."""
from __future__ import annotations

import json

import pytest
from yarl import URL

from server import routes_userdata

from .conftest import start_server


def enc(url: str) -> URL:
    return URL(url, encoded=True)


async def test_users_single_user(server):
    data = await server.get_json("/api/users")
    assert data["storage"] == "server" and isinstance(data["migrated"], bool)
    async with await server.post("/api/users", json={"username": "bob"}) as r:
        assert r.status == 400


async def test_settings_roundtrip_and_merge(server):
    assert await server.get_json("/api/settings") == {}
    assert await server.get_json("/api/settings/Comfy.Locale") is None
    async with await server.post("/api/settings/Comfy.Locale", json="fr") as r:
        assert r.status == 200
    async with await server.post("/api/settings", json={"Comfy.UseNewMenu": "Top", "n": 3}) as r:
        assert r.status == 200
    assert await server.get_json("/api/settings") == {"Comfy.Locale": "fr", "Comfy.UseNewMenu": "Top", "n": 3}
    assert await server.get_json("/settings/n") == 3
    stored = json.loads((server.config.user_dir / "default" / "comfy.settings.json").read_text())
    assert stored["Comfy.Locale"] == "fr"
    async with await server.post("/api/settings", json=[1, 2]) as r:
        assert r.status == 400
    async with await server.post("/api/settings/x", data=b"{not json") as r:
        assert r.status == 400
    async with await server.post("/api/settings/x", data=b"x" * (routes_userdata.MAX_SETTINGS_BYTES + 1)) as r:
        assert r.status == 413
    assert await server.get_json("/api/settings/x") is None


async def test_userdata_store_list_get_move_delete(server):
    wf = json.dumps({"nodes": [], "links": []}).encode()
    url = f"{server.url}/api/userdata/workflows%2Fmy%20flow.json"
    async with server.session.post(enc(url + "?overwrite=false&full_info=true"), data=wf) as r:
        assert r.status == 200, await r.text()
        info = await r.json()
    assert info["path"] == "workflows/my flow.json" and info["size"] == len(wf)
    assert isinstance(info["modified"], int) and isinstance(info["created"], int)
    assert (server.config.user_dir / "default" / "workflows" / "my flow.json").read_bytes() == wf
    async with server.session.post(enc(url + "?overwrite=false"), data=wf) as r:
        assert r.status == 409
    async with server.session.post(enc(url), data=b"{}") as r:     # overwrite defaults to true
        assert r.status == 200 and await r.json() == "workflows/my flow.json"
    async with server.session.get(enc(url)) as r:
        assert r.status == 200 and await r.read() == b"{}"
        assert r.headers["Content-Disposition"] == "attachment"
        assert r.headers["X-Content-Type-Options"] == "nosniff"

    async with server.session.post(enc(f"{server.url}/api/userdata/workflows%2Fsub%2Fdeep.json"), data=b"[]") as r:
        assert r.status == 200
    assert await server.get_json("/api/userdata?dir=workflows") == ["my flow.json"]
    assert await server.get_json("/api/userdata?dir=workflows&recurse=true") == ["my flow.json", "sub/deep.json"]
    assert await server.get_json("/api/userdata?dir=workflows&recurse=true&split=true") == [
        ["my flow.json", "my flow.json"], ["sub/deep.json", "sub", "deep.json"]]
    full = await server.get_json("/api/userdata?dir=workflows&recurse=true&full_info=true")
    assert [f["path"] for f in full] == ["my flow.json", "sub/deep.json"] and full[0]["size"] == 2

    # sdflow's own workflow library reads the same folder
    names = [w["name"] for w in await server.get_json("/api/workflows")]
    assert names == ["my flow"]

    move = f"{server.url}/api/userdata/workflows%2Fmy%20flow.json/move/workflows%2Frenamed.json"
    async with server.session.post(enc(move + "?full_info=true")) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["path"] == "workflows/renamed.json"
    async with server.session.post(enc(f"{server.url}/api/userdata/workflows%2Fsub%2Fdeep.json/move/"
                                       "workflows%2Frenamed.json?overwrite=false")) as r:
        assert r.status == 409
    async with server.session.post(enc(move)) as r:    # source gone now
        assert r.status == 404
    assert await server.get_json("/api/userdata?dir=workflows") == ["renamed.json"]
    async with server.session.delete(enc(f"{server.url}/api/userdata/workflows%2Frenamed.json")) as r:
        assert r.status == 204
    async with server.session.delete(enc(f"{server.url}/api/userdata/workflows%2Frenamed.json")) as r:
        assert r.status == 404
    async with server.session.get(enc(f"{server.url}/api/userdata/workflows%2Frenamed.json")) as r:
        assert r.status == 404


async def test_userdata_list_errors(server):
    async with await server.get("/api/userdata") as r:
        assert r.status == 400
    async with await server.get("/api/userdata?dir=nope") as r:
        assert r.status == 404
    async with server.session.get(enc(f"{server.url}/api/userdata?dir=..%2F..")) as r:
        assert r.status == 403


@pytest.mark.parametrize("name", ["..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd", "%252e%252e%252fsecret.txt",
                                  "..%5C..%5Csecret.txt", "a%00b.json", "..%2Fsdflow.db", "link%2Fx.json"])
async def test_userdata_containment(tmp_path, name):
    (tmp_path / "secret.txt").write_text("SECRET")
    srv, runner = await start_server(tmp_path)
    try:
        root = srv.config.user_dir / "default"
        root.mkdir(parents=True, exist_ok=True)
        (root / "link").symlink_to(tmp_path)
        before = sorted(p.name for p in tmp_path.iterdir())
        base = f"{srv.url}/api/userdata/{name}"
        for method in ("GET", "POST", "DELETE"):
            async with srv.session.request(method, enc(base), data=b"pwned") as r:
                assert r.status in (400, 403, 404), (method, name, r.status)
                assert "SECRET" not in await r.text()
        async with srv.session.post(enc(f"{srv.url}/api/userdata/ok.json/move/{name}"), data=b"") as r:
            assert r.status in (400, 403, 404), r.status
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert (tmp_path / "secret.txt").read_text() == "SECRET"
    finally:
        await srv.session.close()
        await runner.cleanup()


async def test_userdata_size_limit(server, monkeypatch):
    monkeypatch.setattr(routes_userdata, "MAX_USERDATA_BYTES", 1000)
    async with server.session.post(enc(f"{server.url}/api/userdata/big.json"), data=b"x" * 1001) as r:
        assert r.status == 413
    assert not (server.config.user_dir / "default" / "big.json").exists()


# ---- the other routes ComfyUI's front end calls ---------------------------------------------------------

async def test_i18n_subgraphs_templates_and_logs(server):
    import logging

    assert await server.get_json("/api/i18n") == {}
    assert await server.get_json("/api/global_subgraphs") == {}
    templates = await server.get_json("/api/workflow_templates")
    assert "txt2img" in templates["sdflow"] and not any(n.endswith("_api") for n in templates["sdflow"])
    workflow = await server.get_json("/api/workflow_templates/sdflow/txt2img.json")
    assert workflow["nodes"] and workflow["links"]
    async with await server.get("/api/workflow_templates/sdflow/txt2img.jpg") as r:
        assert r.status == 200 and r.content_type == "image/jpeg"
    for bad in ("..%2F..%2Fpyproject.toml", "txt2img_api.json", "nope.json"):
        async with server.session.get(enc(f"{server.url}/api/workflow_templates/sdflow/{bad}")) as r:
            assert r.status in (403, 404), bad
    index = await server.get_json("/templates/index.json")
    assert isinstance(index, list)
    logging.getLogger("sdflow.test").warning("a line for the log view 7c1e")
    text = await server.get_json("/internal/logs")
    assert "a line for the log view 7c1e" in text
    raw = await server.get_json("/internal/logs/raw")
    assert any("7c1e" in e["m"] for e in raw["entries"]) and set(raw["size"]) == {"cols", "rows"}


async def test_experiment_models_and_view_metadata(tmp_path):
    import torch
    from aiohttp import web
    from safetensors.torch import save_file

    import nodes
    from engine.config import RuntimeConfig
    from server.app import create_app
    from server.state import ServerOptions

    from .conftest import Server, free_port

    config = RuntimeConfig(data_dir=tmp_path / "data")
    config.ensure_dirs()
    ckpts = config.models_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(ckpts / "m.safetensors"), metadata={"modelspec.title": "My model"})
    (ckpts / "sub").mkdir()
    save_file({"x": torch.zeros(1)}, str(ckpts / "sub" / "n.safetensors"))
    registry, catalog = nodes.build_registry(config, plugins=False)
    port = free_port()
    app = create_app(config, registry, catalog, options=ServerOptions(port=port))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    import aiohttp
    srv = Server(f"http://127.0.0.1:{port}", port, config, aiohttp.ClientSession(), app)
    try:
        folders = await srv.get_json("/api/experiment/models")
        entry = next(f for f in folders if f["name"] == "checkpoints")
        assert str(ckpts) in entry["folders"]
        files = await srv.get_json("/api/experiment/models/checkpoints")
        assert [f["name"] for f in files] == ["m.safetensors", "sub/n.safetensors"]
        assert files[0]["pathIndex"] == 0 and files[0]["size"] == (ckpts / "m.safetensors").stat().st_size
        async with await srv.get("/api/experiment/models/nope") as r:
            assert r.status == 404
        meta = await srv.get_json("/api/view_metadata/checkpoints?filename=m.safetensors")
        assert meta == {"modelspec.title": "My model"}
        for bad in ("..%2F..%2Fsdflow.db", "missing.safetensors"):
            async with srv.session.get(enc(f"{srv.url}/api/view_metadata/checkpoints?filename={bad}")) as r:
                assert r.status in (403, 404), bad
        async with await srv.get("/api/experiment/models/preview/checkpoints/0/m.safetensors") as r:
            assert r.status == 404                         # no preview image beside it
        from PIL import Image
        Image.new("RGB", (8, 8), (200, 10, 10)).save(ckpts / "m.png")
        async with await srv.get("/api/experiment/models/preview/checkpoints/0/m.safetensors") as r:
            assert r.status == 200 and r.content_type == "image/webp"
    finally:
        await srv.session.close()
        await runner.cleanup()


async def test_jobs_view_of_queue_and_history(server):
    from .conftest import chain

    ws = await server.connect()
    done = await server.queue_prompt(chain(3), client_id=ws.sid)
    await ws.until_done(done["prompt_id"])
    await ws.close()
    async with await server.post("/queue", json={"pause": True}) as r:
        assert r.status == 200
    pending = await server.queue_prompt(chain(4))
    data = await server.get_json("/api/jobs?status=completed,failed,cancelled&limit=64&offset=0")
    assert data["pagination"] == {"offset": 0, "limit": 64, "total": 1, "has_more": False}
    job = data["jobs"][0]
    assert job["id"] == done["prompt_id"] and job["status"] == "completed"
    assert isinstance(job["create_time"], int) and job["execution_end_time"] >= job["execution_start_time"]
    queued = await server.get_json("/api/jobs?status=in_progress,pending")
    assert [j["id"] for j in queued["jobs"]] == [pending["prompt_id"]] and queued["jobs"][0]["status"] == "pending"
    everything = await server.get_json("/api/jobs?limit=1")
    assert everything["pagination"]["total"] == 2 and everything["pagination"]["has_more"] is True
    assert everything["jobs"][0]["id"] == pending["prompt_id"]        # newest first
    detail = await server.get_json(f"/api/jobs/{done['prompt_id']}")
    assert detail["outputs"] == {"4": {"text": ["13"]}} and detail["workflow"]["prompt"]["4"]["class_type"]
    async with await server.get("/api/jobs/nope") as r:
        assert r.status == 404
    async with await server.get("/api/jobs?status=bogus") as r:
        assert r.status == 400
    async with await server.post("/queue", json={"clear": True, "resume": True}) as r:
        assert r.status == 200


def test_frontend_option_finds_the_package_or_says_how_to_install(monkeypatch):
    import importlib.util

    from server import cli, comfy_frontend

    args = cli.build_parser().parse_args(["serve", "--frontend", "comfyui", "--preview-method", "auto"])
    assert args.preview_method == "auto"
    if importlib.util.find_spec("comfyui_frontend_package") is not None:
        assert (cli._web_root(args) / "index.html").is_file()
    monkeypatch.setattr(comfy_frontend, "PACKAGE", "no_such_frontend_package_xyz")
    with pytest.raises(SystemExit, match=r"pip install 'sdflow\[comfyui-frontend\]'"):
        cli._web_root(args)
    plain = cli.build_parser().parse_args(["serve"])
    assert plain.frontend == "sdflow" and plain.preview_method == "none" and cli._web_root(plain) is None
