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
