"""Hostile requests, fuzz-style: every one gets a 4xx with a clear message, no reply shows an absolute
server path, and the server keeps serving."""
from __future__ import annotations

import asyncio
import io
import json
import re

import aiohttp
import pytest
from PIL import Image

from .conftest import chain, start_server

STATE_CHANGING = ("POST", "PUT", "DELETE", "PATCH")


def state_changing_routes(app) -> list[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        if route.method in STATE_CHANGING:
            info = route.resource.get_info() if route.resource is not None else {}
            path = info.get("path") or info.get("formatter")
            if path:
                found.add((route.method, re.sub(r"\{[^}]+\}", "x", path)))
    return sorted(found)


def assert_no_server_path(text: str, srv) -> None:
    for root in {str(srv.config.data_dir.resolve()), str(srv.config.data_dir), str(srv.config.data_dir.parent)}:
        assert root not in text, text


async def assert_alive(srv) -> None:
    data = await srv.queue_prompt(chain(2))
    entry = await srv.wait_history(data["prompt_id"])
    assert entry["status"]["status_str"] == "success"


# ---- origin -------------------------------------------------------------------------------------

def foreign_origins(port: int) -> list[str]:
    return [
        "http://127.0.0.1", "http://localhost", "http://127.0.0.1:80",    # same host, another port (80)
        f"https://127.0.0.1:{port}", f"https://localhost:{port}", "https://127.0.0.1",   # another scheme
        f"ws://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 1}", f"http://[::1]:{port}",
        f"http://localhost:{port}",                  # another host name than the Host the client used
        f"http://127.0.0.1:{port}@evil.example", f"http://127.0.0.1:{port}/path", "http://127.0.0.1:99999",
        f"file://127.0.0.1:{port}", "chrome-extension://abcdef",
    ]


async def test_origin_must_match_scheme_host_and_port_on_every_state_changing_route(server):
    routes = state_changing_routes(server.app)
    assert len(routes) >= 10, routes
    for origin in foreign_origins(server.port):
        for method, path in routes:
            async with server.session.request(method, server.url + path, json={},
                                              headers={"Origin": origin}) as r:
                assert r.status == 403, (origin, method, path, r.status)
                body = await r.json()
                assert body["error"]["type"] == "forbidden" and "Origin" in body["error"]["message"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await server.session.ws_connect(server.url + "/ws", headers={"Origin": origin})
        assert exc.value.status == 403, origin
    # the server's own origin (as the browser writes it) is accepted
    own = f"http://127.0.0.1:{server.port}"
    async with await server.post("/queue", json={"clear": True}, headers={"Origin": own}) as r:
        assert r.status == 200
    ws = await server.session.ws_connect(server.url + "/ws", headers={"Origin": own})
    await ws.close()
    assert (await server.get_json("/queue"))["queue_pending"] == []


async def test_allowed_origin_is_exact(tmp_path):
    srv, runner = await start_server(tmp_path, allowed_origins=["https://sd.example.com"])
    try:
        for origin, status in (("https://sd.example.com", 200), ("https://sd.example.com:443", 200),
                               ("http://sd.example.com", 403), ("https://sd.example.com:8443", 403)):
            headers = {"Origin": origin}
            async with await srv.post("/queue", json={"clear": True}, headers=headers) as r:
                assert r.status == status, origin
    finally:
        await srv.session.close()
        await runner.cleanup()


# ---- fuzz-style: surrogates, long names, null inputs, deep nesting ------------------------------------

SURROGATE = "\ud800"
LONG = "a" * 300


def raw_json(obj) -> str:
    """JSON text as a client may send it, lone surrogates included (json.dumps escapes them as \\ud800)."""
    return json.dumps(obj)


HOSTILE_POSTS = [
    ("prompt_id surrogate", "/prompt", {"prompt": chain(1), "prompt_id": SURROGATE}, "prompt_id"),
    ("client_id surrogate", "/prompt", {"prompt": chain(1), "client_id": "x" + SURROGATE}, "client_id"),
    ("queue delete surrogate", "/queue", {"delete": [SURROGATE]}, "delete"),
    ("history delete surrogate", "/history", {"delete": ["ok", SURROGATE]}, "delete"),
    ("interrupt surrogate", "/interrupt", {"prompt_id": SURROGATE}, "prompt_id"),
    ("null widget", "/prompt", {"prompt": {**chain(1), "3": {"class_type": "TestAdd",
                                                              "inputs": {"a": ["1", 0], "b": None}}}},
     "b: null is not a value"),
    ("null link", "/prompt", {"prompt": {**chain(1), "4": {"class_type": "TestShow", "inputs": {"value": None}}}},
     "value: null is not a value"),
    ("unknown class", "/prompt", {"prompt": {**chain(1), "1": {"class_type": "TestConts", "inputs": {}}}},
     "TestConst"),
    ("workflow run surrogate", "/workflows/none/run", {"prompt_id": SURROGATE}, "workflow"),
]


@pytest.mark.parametrize("label, path, body, names", HOSTILE_POSTS, ids=[h[0] for h in HOSTILE_POSTS])
async def test_hostile_json_gets_a_clear_4xx(server, label, path, body, names):
    async with await server.post(path, data=raw_json(body), headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        assert 400 <= r.status < 500, (label, r.status, text)
    assert names in text, (label, text)
    assert_no_server_path(text, server)
    await assert_alive(server)


def deep(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [900, 5000, 100_000])
async def test_deeply_nested_json(server, depth):
    body = '{"prompt": {"1": {"class_type": "TestConst", "inputs": {"value": ' + "[" * depth + "1" + \
        "]" * depth + '}}, "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}}'
    async with await server.post("/prompt", data=body, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        assert r.status == 400, text
    assert "nested" in text or "value" in text
    await assert_alive(server)


def multipart(data: bytes, **fields: str) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    fd.add_field("image", data, filename=fields.pop("filename", "x.png"), content_type="image/png")
    for k, v in fields.items():
        fd.add_field(k, v)
    return fd


def png(size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return buf.getvalue()


VIEW_CASES = [
    ("long subfolder", {"filename": "x.png", "subfolder": LONG}),
    ("long nested subfolder", {"filename": "x.png", "subfolder": f"ok/{LONG}/more"}),
    ("long filename", {"filename": LONG + ".png"}),
    ("surrogate filename", {"filename": "%ED%A0%80.png"}),
    ("latin-1 byte", {"filename": "%FF.png"}),
]


@pytest.mark.parametrize("label, query", VIEW_CASES, ids=[c[0] for c in VIEW_CASES])
async def test_view_refuses_bad_names_without_showing_paths(server, label, query):
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    async with await server.get("/view?" + qs) as r:
        text = await r.text()
        assert 400 <= r.status < 500, (label, r.status, text)
    assert_no_server_path(text, server)
    await assert_alive(server)


UPLOAD_CASES = [
    ("long subfolder", {"subfolder": LONG}, "subfolder"),
    ("long nested subfolder", {"subfolder": f"a/{LONG}"}, "subfolder"),
    ("long filename", {"filename": LONG + ".png"}, "too long"),
    ("subfolder is a file", {"subfolder": "taken.png"}, "subfolder"),
    ("subfolder under a file", {"subfolder": "taken.png/deeper"}, "subfolder"),
]


@pytest.mark.parametrize("label, fields, words", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
async def test_upload_refuses_bad_names(server, label, fields, words):
    (server.config.input_dir / "taken.png").write_bytes(png())
    async with await server.post("/upload/image", data=multipart(png(), **fields)) as r:
        text = await r.text()
        assert 400 <= r.status < 500, (label, r.status, text)
    assert words in text, text
    assert_no_server_path(text, server)
    await assert_alive(server)


@pytest.mark.parametrize("field", [b"subfolder", b"type", b"overwrite"])
async def test_upload_with_undecodable_form_fields(server, field):
    boundary = b"XyZ"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"" + field + b"\"\r\n\r\na\xed\xa0\x80\xff\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png() + b"\r\n--XyZ--\r\n")
    async with await server.post("/upload/image", data=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()}) as r:
        text = await r.text()
        assert r.status == 400 or (field == b"overwrite" and r.status == 200), (r.status, text)
    assert_no_server_path(text, server)
    await assert_alive(server)


async def raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfe", b"Authorization: Bearer \xed\xa0\x80",
                                    b"Authorization: \xc3", b"Origin: http://\xff", b"Host: 127.0.0.1:\xb2"])
async def test_non_utf8_headers(tmp_path, header):
    srv, runner = await start_server(tmp_path, token="tok")
    try:
        body = b"{}"
        head = (b"POST /queue HTTP/1.1\r\nHost: 127.0.0.1:" + str(srv.port).encode() + b"\r\n" + header +
                b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n" + body)
        if header.startswith(b"Host"):
            head = head.replace(b"Host: 127.0.0.1:" + str(srv.port).encode() + b"\r\n", b"")
        status, data = await raw_request(srv.port, head)
        assert 400 <= status < 500, data
        assert_no_server_path(data.decode("latin-1"), srv)
        async with await srv.get("/queue") as r:
            assert r.status == 200
    finally:
        await srv.session.close()
        await runner.cleanup()


# ---- heavy requests: memory stays bounded ---------------------------------------------------------

MB = 1024 * 1024


def rss() -> int:
    """The server's resident memory (it runs in this process)."""
    import psutil
    return psutil.Process().memory_info().rss


async def test_huge_cycle_is_refused_with_a_small_answer_and_bounded_memory(server):
    size = 20_000
    prompt = {str(i): {"class_type": "TestAdd", "inputs": {"a": [str((i + 1) % size), 0], "b": 1}}
              for i in range(size)}
    prompt["out"] = {"class_type": "TestShow", "inputs": {"value": ["0", 0]}}
    before = rss()
    async with await server.post("/prompt", json={"prompt": prompt}) as r:
        body = await r.read()
        assert r.status == 400
    assert len(body) < 50_000, len(body)
    data = json.loads(body)
    cycle = [e for entry in data["node_errors"].values() for e in entry["errors"] if e["type"] == "dependency_cycle"]
    assert cycle and cycle[0]["extra_info"]["cycle_size"] == size
    assert rss() - before < 400 * MB, (rss() - before) / MB
    await assert_alive(server)


async def test_image_bombs_refused_from_the_header_with_bounded_memory(server):
    from tests.image_bombs import bomb_png

    bomb = bomb_png(11000, 11000)
    assert len(bomb) < 400_000
    before = rss()
    async with await server.post("/upload/image", data=multipart(bomb, filename="bomb.png")) as r:
        text = await r.text()
        assert r.status == 413, text
    assert "11000x11000" in text and "budget" in text
    assert not (server.config.input_dir / "bomb.png").exists()
    # as the mask, and as the original the mask is merged into
    (server.config.input_dir / "small.png").write_bytes(png((8, 8)))
    ref = json.dumps({"filename": "small.png", "type": "input"})
    async with await server.post("/upload/mask", data=multipart(bomb, filename="m.png", original_ref=ref)) as r:
        assert r.status == 413, await r.text()
    (server.config.input_dir / "big.png").write_bytes(bomb)
    ref = json.dumps({"filename": "big.png", "type": "input"})
    async with await server.post("/upload/mask", data=multipart(png((8, 8)), filename="m2.png",
                                                                original_ref=ref)) as r:
        assert r.status == 413, await r.text()
    async with await server.get("/view?filename=big.png&type=input&preview=webp") as r:
        assert r.status == 413, await r.text()
    assert rss() - before < 300 * MB, (rss() - before) / MB
    await assert_alive(server)


async def test_run_time_errors_show_no_server_paths(server):
    secret = str(server.config.data_dir.resolve() / "models" / "checkpoints")
    prompt = {"1": {"class_type": "TestConst", "inputs": {"value": 1}},
              "2": {"class_type": "TestFail", "inputs": {"value": ["1", 0],
                                                         "message": f"not found in: {secret}, /etc/sdflow"}},
              "3": {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}}
    ws = await server.connect()
    data = await server.queue_prompt(prompt, client_id=ws.sid)
    frames = await ws.until_done(data["prompt_id"])
    errors = [m["data"] for kind, m in frames if kind == "json" and m["type"] == "execution_error"]
    assert errors and "checkpoints" in errors[0]["exception_message"]
    entry = await server.wait_history(data["prompt_id"])
    recorded = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    for err in (errors[0], recorded[0]):      # current_inputs echo the client's own values; the rest is ours
        text = json.dumps([err["exception_message"], err["traceback"]])
        assert_no_server_path(text, server)
        assert "/etc/sdflow" not in text and 'File \\"/' not in text
    await ws.close()


async def test_workflow_run_refuses_an_input_the_node_lacks(server):
    async with await server.post("/workflows/wf", json=chain(1)) as r:
        assert r.status == 200
    async with await server.post("/workflows/wf/run", json={"inputs": {"3.bb": 5}}) as r:
        body = await r.json()
        assert r.status == 400, body
    assert "node 3 (TestAdd) has no input 'bb'" in body["error"]["details"]
    assert "did you mean b" in body["error"]["details"]
    async with await server.post("/workflows/wf/run", json={"inputs": {"3.b": 5}}) as r:
        assert r.status == 200
        pid = (await r.json())["prompt_id"]
    entry = await server.wait_history(pid)
    assert entry["outputs"]["4"] == {"text": ["6"]}                  # 1 + 5: the override took effect
