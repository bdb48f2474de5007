"""Hostile paths on every path-taking route, cross-origin refusals, and the auth token."""
from __future__ import annotations

import io
import json
import os

import aiohttp
import pytest
from PIL import Image
from yarl import URL

from .conftest import start_server

SECRET = "TOPSECRET-4f1c"

# (raw, already percent-encoded query value, label)
HOSTILE = [
    ("..%2F..%2Fsecret.txt", "dotdot"),
    ("..%2Finput%2Finside.png", "sibling dir"),
    ("%2Fetc%2Fpasswd", "absolute"),
    ("%2e%2e%2f%2e%2e%2fsecret.txt", "encoded dots"),
    ("%252e%252e%252fsecret.txt", "double encoded"),
    ("..%5C..%5Csecret.txt", "backslashes"),
    ("link.png", "symlink file out"),
    ("secret.txt%00.png", "NUL"),
    ("C%3A%5Cwindows%5Cwin.ini", "drive letter"),
]
HOSTILE_SUBFOLDERS = [
    ("..%2F..", "dotdot"), ("%2Ftmp", "absolute"), ("%2e%2e%2f%2e%2e", "encoded"), ("linkdir", "symlink dir out"),
    ("sub%00", "NUL"), ("..", "parent"),
]


@pytest.fixture
async def hostile_server(tmp_path):
    (tmp_path / "secret.txt").write_text(SECRET)
    srv, runner = await start_server(tmp_path)
    out = srv.config.output_dir
    os.symlink(tmp_path / "secret.txt", out / "link.png")
    os.symlink(tmp_path, out / "linkdir")
    os.symlink(tmp_path, srv.config.input_dir / "linkdir")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    (srv.config.input_dir / "inside.png").write_bytes(buf.getvalue())
    (out / "ok.png").write_bytes(buf.getvalue())
    try:
        yield srv, tmp_path
    finally:
        await srv.session.close()
        await runner.cleanup()


def outside_files(tmp_path) -> set[str]:
    """Every file outside the data dir (so a write that escaped shows up)."""
    found = set()
    for root, _dirs, names in os.walk(tmp_path):
        if os.path.realpath(root).startswith(os.path.realpath(tmp_path / "data")):
            continue
        found |= {os.path.join(root, n) for n in names}
    return found


async def assert_refused(resp: aiohttp.ClientResponse, label: str) -> None:
    body = await resp.read()
    assert resp.status in (400, 403, 404), (label, resp.status, body[:200])
    assert SECRET.encode() not in body, label


async def test_view_refuses_hostile_paths(hostile_server):
    srv, _ = hostile_server
    async with await srv.session.get(URL(srv.url + "/view?filename=ok.png", encoded=True)) as r:
        assert r.status == 200  # the control case works
    for value, label in HOSTILE:
        for prefix in ("", "/api"):
            url = URL(f"{srv.url}{prefix}/view?filename={value}&type=output", encoded=True)
            async with await srv.session.get(url) as r:
                await assert_refused(r, f"view filename {label}")
    for value, label in HOSTILE_SUBFOLDERS:
        url = URL(f"{srv.url}/view?filename=secret.txt&subfolder={value}", encoded=True)
        async with await srv.session.get(url) as r:
            await assert_refused(r, f"view subfolder {label}")
    for kind in ("..", "%2e%2e", "output%2F..", "secret"):
        url = URL(f"{srv.url}/view?filename=secret.txt&type={kind}", encoded=True)
        async with await srv.session.get(url) as r:
            await assert_refused(r, f"view type {kind}")


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


def raw_multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "sdflowboundary7"
    filename = filename.replace("\\", "\\\\").replace('"', '\\"')   # quoted-string escapes, so they arrive
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode("utf-8", "surrogateescape")
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def test_uploads_refuse_hostile_names(hostile_server):
    srv, tmp_path = hostile_server
    before = outside_files(tmp_path)
    from urllib.parse import unquote
    for value, label in HOSTILE:
        name = unquote(unquote(value))
        # a hand-built multipart body: the client library would refuse or quote some of these names
        body, ctype = raw_multipart(name, png())
        async with await srv.post("/upload/image", data=body, headers={"Content-Type": ctype}) as r:
            if name == "link.png":
                # a plain name (the symlink lives in output; uploads go to input): accepted, written inside
                assert r.status == 200
                continue
            await assert_refused(r, f"upload filename {label}")
    for value, label in HOSTILE_SUBFOLDERS:
        for route in ("/upload/image", "/api/upload/mask"):
            fd = aiohttp.FormData()
            fd.add_field("image", png(), filename="x.png", content_type="image/png")
            fd.add_field("subfolder", unquote(value))
            fd.add_field("original_ref", json.dumps({"filename": "inside.png", "type": "input"}))
            async with await srv.post(route, data=fd) as r:
                await assert_refused(r, f"{route} subfolder {label}")
    for kind in ("..", "../x", "secret"):
        fd = aiohttp.FormData()
        fd.add_field("image", png(), filename="x.png", content_type="image/png")
        fd.add_field("type", kind)
        async with await srv.post("/upload/image", data=fd) as r:
            await assert_refused(r, f"upload type {kind}")
    # the mask's original_ref is a path too
    for ref in ({"filename": "../../secret.txt"}, {"filename": "/etc/passwd"}, {"filename": "link.png"},
                {"filename": "secret.txt", "subfolder": "linkdir", "type": "input"},
                {"filename": "secret.txt", "subfolder": "../..", "type": "output"},
                {"filename": "x\x00.png"}, {"filename": "ok.png", "type": "../output"}):
        fd = aiohttp.FormData()
        fd.add_field("image", png(), filename="m.png", content_type="image/png")
        fd.add_field("original_ref", json.dumps(ref))
        async with await srv.post("/upload/mask", data=fd) as r:
            await assert_refused(r, f"mask original_ref {ref}")
    assert outside_files(tmp_path) == before, "an upload escaped the data dir"
    assert (tmp_path / "secret.txt").read_text() == SECRET


async def test_workflow_names_refused(hostile_server):
    srv, tmp_path = hostile_server
    before = outside_files(tmp_path)
    names = ["..%2F..%2F..%2Fevil", "%2e%2e", "..", "%2Ftmp%2Fevil", "a%00b", ".hidden", "x%5C..%5C..%5Cevil",
             "a" * 300, "%2e%2e%2f%2e%2e%2fsecret"]
    for name in names:
        for method in ("GET", "POST", "DELETE"):
            url = URL(f"{srv.url}/workflows/{name}", encoded=True)
            async with srv.session.request(method, url, json={"nodes": []}) as r:
                await assert_refused(r, f"workflows {method} {name}")
    assert outside_files(tmp_path) == before
    wf = srv.config.user_dir / "default" / "workflows"
    assert not wf.exists() or not any(wf.iterdir())


async def test_static_editor_refuses_escapes(tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>ed</html>")
    (tmp_path / "secret.txt").write_text(SECRET)
    os.symlink(tmp_path / "secret.txt", dist / "link.js")
    srv, runner = await start_server(tmp_path, web_root=dist)
    try:
        for path in ("/..%2Fsecret.txt", "/%2e%2e/secret.txt", "/link.js", "/assets/..%2F..%2Fsecret.txt",
                     "/%2Fetc%2Fpasswd"):
            async with await srv.session.get(URL(srv.url + path, encoded=True)) as r:
                await assert_refused(r, f"static {path}")
    finally:
        await srv.session.close()
        await runner.cleanup()


async def test_load_image_widget_cannot_escape(hostile_server):
    """A LoadImage-style node resolves its widget value with contained_path too."""
    srv, _ = hostile_server
    for name in ("../../secret.txt", "linkdir/secret.txt", "/etc/passwd"):
        prompt = {"1": {"class_type": "TestLoadImage", "inputs": {"image": name}},
                  "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
        async with await srv.post("/prompt", json={"prompt": prompt}) as r:
            body = await r.json()
            assert r.status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


# ---- origin / CSRF ------------------------------------------------------------------------------

async def test_cross_origin_state_changes_refused(server):
    prompt = {"prompt": {"1": {"class_type": "TestConst", "inputs": {"value": 1}},
                         "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}}
    host = f"127.0.0.1:{server.port}"
    refused = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{server.port + 1}"},
        {"Origin": "http://localhost.evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": f"http://{host}", "Sec-Fetch-Site": "cross-site"},
        {"Host": "attacker.example", "Origin": "http://attacker.example"},   # DNS rebinding
    ]
    for headers in refused:
        for path, body in (("/prompt", prompt), ("/api/queue", {"clear": True}), ("/interrupt", {}),
                           ("/history", {"clear": True}), ("/free", {}), ("/workflows/x", {"a": 1})):
            async with await server.post(path, json=body, headers=headers) as r:
                assert r.status == 403, (headers, path, r.status)
                assert (await r.json())["error"]["type"] == "forbidden"
    async with server.session.put(server.url + "/workflows/x", json={}, headers={"Origin": "null"}) as r:
        assert r.status == 403
    async with server.session.delete(server.url + "/workflows/x", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403
    # nothing was queued by the refused requests
    assert (await server.get_json("/queue"))["queue_pending"] == []
    # a rebinding Host is refused even for reads
    async with await server.get("/object_info", headers={"Host": "attacker.example"}) as r:
        assert r.status == 403
    # same-origin and non-browser clients work
    for headers in ({"Origin": f"http://{host}"}, {"Origin": f"http://localhost:{server.port}",
                                                   "Host": f"localhost:{server.port}"},
                    {}, {"Sec-Fetch-Site": "same-origin"}):
        async with await server.post("/prompt", json=prompt, headers=headers) as r:
            assert r.status == 200, (headers, await r.text())
    # websocket upgrades from a foreign page are refused too (cross-site websocket hijacking)
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await server.session.ws_connect(server.url + "/ws", headers={"Origin": "http://evil.example"})
    assert exc.value.status == 403


async def test_allowed_origins_for_a_proxy(tmp_path):
    srv, runner = await start_server(tmp_path, allowed_origins=["https://sd.example.com"])
    try:
        headers = {"Origin": "https://sd.example.com", "Host": "sd.example.com"}
        async with await srv.post("/queue", json={"clear": True}, headers=headers) as r:
            assert r.status == 200
        async with await srv.post("/queue", json={"clear": True}, headers={"Origin": "https://other.example"}) as r:
            assert r.status == 403
    finally:
        await srv.session.close()
        await runner.cleanup()


# ---- auth token ---------------------------------------------------------------------------------

async def test_token_required_on_http_and_websocket(tmp_path):
    srv, runner = await start_server(tmp_path, token="s3cret-token")
    session = srv.session
    try:
        for path in ("/prompt", "/api/prompt", "/queue", "/history", "/object_info", "/system_stats",
                     "/view?filename=x.png", "/api/openapi.json", "/workflows", "/features"):
            async with session.get(srv.url + path) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with session.get(srv.url + path, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401, path
        async with session.post(srv.url + "/queue", json={"clear": True}) as r:
            assert r.status == 401
        async with session.get(srv.url + "/prompt", headers={"Authorization": "Bearer s3cret-token"}) as r:
            assert r.status == 200
        async with session.get(srv.url + "/api/queue?token=s3cret-token") as r:
            assert r.status == 200
        # the static editor page loads without it (it has to, to be able to send the token)
        async with session.get(srv.url + "/") as r:
            assert r.status == 200
        for url in (srv.url + "/ws", srv.url + "/api/ws?token=nope"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await session.ws_connect(url)
            assert exc.value.status == 401
        ws = await session.ws_connect(srv.url + "/ws?clientId=t&token=s3cret-token")
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "status"
        await ws.close()
        ws = await session.ws_connect(srv.url + "/ws", headers={"Authorization": "Bearer s3cret-token"})
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "status"
        await ws.close()
    finally:
        await session.close()
        await runner.cleanup()
