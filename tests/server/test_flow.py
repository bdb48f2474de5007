"""The ComfyUI client flow against a real server: /prompt + /ws + /history + /view, and sdflow's extras."""
from __future__ import annotations

import io
import json
import struct

import aiohttp
import pytest
from PIL import Image

from engine.ui_workflow import api_to_ui
from tests.waiting import until

from .conftest import chain


def types(frames) -> list[str]:
    return [f[1]["type"] if f[0] == "json" else "binary" for f in frames]


async def test_full_event_sequence_and_history(server):
    ws = await server.connect()
    r = await server.queue_prompt(chain(5, steps=3, delay=0.01), client_id=ws.sid)
    pid = r["prompt_id"]
    assert r["node_errors"] == {} and isinstance(r["number"], int)
    frames = await ws.until_done(pid)
    seq = [t for t in types(frames) if t not in ("status", "progress_state")]
    assert seq == ["execution_start", "execution_cached",
                   "executing", "executing", "progress", "binary", "progress", "binary", "progress", "binary",
                   "executing", "executing", "executed", "execution_success", "executing"]
    data = {f[1]["type"]: f[1]["data"] for f in frames if f[0] == "json"}
    assert data["execution_cached"]["nodes"] == []
    assert data["executed"] == {"node": "4", "display_node": "4", "output": {"text": ["15"]}, "prompt_id": pid}
    progress = [f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "progress"]
    assert progress[-1] == {"value": 3, "max": 3, "prompt_id": pid, "node": "2"}
    # preview frames: type 1 (JPEG) for a client that did not ask for metadata
    binary = [f[1] for f in frames if f[0] == "binary"]
    kind, fmt = struct.unpack(">II", binary[0][:8])
    assert (kind, fmt) == (1, 1)
    assert Image.open(io.BytesIO(binary[0][8:])).format == "JPEG"
    # progress_state: every node that left 'pending', with its state (frames are coalesced under load,
    # so only the first and the last are certain); the last one has them all finished
    states = [f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "progress_state"]
    assert states and "running" in {v["state"] for v in states[0]["nodes"].values()}
    assert {n: v["state"] for n, v in states[-1]["nodes"].items()} == {n: "finished" for n in "1234"}
    assert states[-1]["nodes"]["2"]["value"] == states[-1]["nodes"]["2"]["max"] == 3
    assert set(states[-1]["nodes"]["2"]) == {"value", "max", "state", "node_id", "prompt_id", "display_node_id",
                                             "parent_node_id", "real_node_id"}
    # every JSON event of this prompt names it
    assert all(f[1]["data"].get("prompt_id") == pid for f in frames if f[0] == "json" and f[1]["type"] != "status")

    entry = (await server.get_json(f"/history/{pid}"))[pid]
    assert entry["prompt"][1] == pid and entry["prompt"][4] == ["4"]
    assert entry["prompt"][3]["client_id"] == ws.sid
    assert entry["outputs"] == {"4": {"text": ["15"]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["meta"]["4"]["node_id"] == "4"
    assert await server.get_json("/prompt") == {"exec_info": {"queue_remaining": 0, "paused": False}}
    await ws.close()


async def test_cached_rerun_executes_nothing(server):
    ws = await server.connect()
    prompt = chain(2, steps=2, delay=0.01)
    first = await server.queue_prompt(prompt, client_id=ws.sid)
    await ws.until_done(first["prompt_id"])
    second = await server.queue_prompt(prompt, client_id=ws.sid)
    frames = await ws.until_done(second["prompt_id"])
    msgs = [f[1] for f in frames if f[0] == "json" and f[1]["type"] != "status"]
    cached = next(m for m in msgs if m["type"] == "execution_cached")
    assert sorted(cached["data"]["nodes"]) == ["1", "2", "3", "4"]
    executing = [m["data"]["node"] for m in msgs if m["type"] == "executing"]
    assert executing == [None], "nothing may execute on a fully cached re-run"
    assert not any(m["type"] == "progress" for m in msgs)
    # the cached output node still reports its UI
    assert next(m for m in msgs if m["type"] == "executed")["data"]["output"] == {"text": ["12"]}
    assert msgs[-2]["type"] == "execution_success"
    stats = await server.get_json("/system_stats")
    assert stats["cache"]["entries"] >= 4 and stats["cache"]["hits"] >= 4
    await ws.close()


async def test_interrupt_mid_run(server):
    ws = await server.connect()
    r = await server.queue_prompt(chain(1, steps=200, delay=0.02), client_id=ws.sid)
    pid = r["prompt_id"]
    while True:  # wait until the slow node reports progress, then interrupt
        msg = await ws.next_json()
        if msg["type"] == "progress":
            break
    first = msg["data"]["value"]
    async with await server.post("/interrupt", json={"prompt_id": "not-running"}) as resp:
        assert resp.status == 200
    # The node checks for an interrupt at every progress report: ten more steps prove the foreign id was
    # ignored (far more than could have been on their way when the request was handled).
    while not (msg["type"] == "progress" and msg["data"]["value"] >= first + 10):
        msg = await ws.next_json()
    assert (await server.get_json("/queue"))["queue_running"][0][1] == pid, "a foreign id must not interrupt"
    async with await server.post("/api/interrupt", json={"prompt_id": pid}) as resp:
        assert resp.status == 200
    frames = await ws.until_done(pid, timeout=10)
    interrupted = [f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_id"] == "2" and interrupted[0]["node_type"] == "TestSlow"
    assert interrupted[0]["executed"] == ["1"]
    entry = await server.wait_history(pid)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    await ws.close()


async def test_execution_error_names_the_node(server):
    ws = await server.connect()
    prompt = {"1": {"class_type": "TestConst", "inputs": {"value": 3}},
              "2": {"class_type": "TestFail", "inputs": {"value": ["1", 0], "message": "kaboom"}},
              "3": {"class_type": "TestShow", "inputs": {"value": ["2", 0]}}}
    r = await server.queue_prompt(prompt, client_id=ws.sid)
    frames = await ws.until_done(r["prompt_id"])
    err = next(f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "execution_error")
    assert err["node_id"] == "2" and err["node_type"] == "TestFail"
    assert err["exception_type"] == "ValueError" and "kaboom" in err["exception_message"]
    assert err["traceback"] and err["executed"] == ["1"] and err["current_inputs"]["message"] == ["kaboom"]
    entry = await server.wait_history(r["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    # the server keeps working after a failing prompt
    ok = await server.queue_prompt(chain(1), client_id=ws.sid)
    await ws.until_done(ok["prompt_id"])
    await ws.close()


async def test_validation_errors_are_400(server):
    bad_value = chain(1)
    bad_value["3"]["inputs"]["b"] = "not a number"
    async with await server.post("/prompt", json={"prompt": bad_value}) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["3"]["class_type"] == "TestAdd"
    assert body["node_errors"]["3"]["errors"][0]["type"] == "invalid_input_type"
    assert body["node_errors"]["3"]["dependent_outputs"] == ["4"]

    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    async with await server.post("/prompt", json={"prompt": unknown}) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["type"] == "invalid_prompt"
        assert "NoSuchNode" in body["error"]["message"] and body["error"]["details"] == "Node ID '#1'"

    async with await server.post("/prompt", json={}) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "no_prompt"
    async with await server.post("/prompt", json={"prompt": {"1": {"class_type": "TestConst",
                                                                   "inputs": {"value": 1}}}}) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "prompt_no_outputs"
    huge = chain(1)
    huge["1"]["inputs"]["value"] = 10**40
    async with await server.post("/prompt", json={"prompt": huge}) as r:
        body = await r.json()
        assert r.status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
    assert (await server.get_json("/queue"))["queue_pending"] == []


async def test_malformed_requests_give_clear_4xx(server):
    cases = [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": 5}', "must be a JSON object of nodes"),
        (b'{"prompt": {}, "number": "NaN"}', "number"),
        (b'{"prompt": {}, "number": 1e400}', "number"),
        (b'{"prompt": {}, "extra_data": []}', "extra_data"),
        (b'{"prompt": {}, "front": "yes"}', "front"),
        (b'{"prompt": {}, "prompt_id": 12}', "prompt_id"),
        (b'{"prompt": {}, "partial_execution_targets": "4"}', "partial_execution_targets"),
        (b'{"prompt": {"1": {"class_type": "TestShow", "inputs": {"value": ' + b"9" * 5000 + b'}}}}', "JSON"),
        (b'{"prompt": {"1": {"class_type": 7}}}', "class_type"),
        (b"\xff\xfe", "UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "JSON"),
    ]
    for raw, fragment in cases:
        async with await server.post("/prompt", data=raw, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            assert r.status == 400, (raw[:60], r.status, text)
            assert fragment in text, (raw[:60], text)
    for path, body in [("/queue", b'{"delete": "x"}'), ("/history", b'{"delete": [1]}'),
                       ("/interrupt", b'{"prompt_id": 3}')]:
        async with await server.post(path, data=body) as r:
            assert r.status == 400, path
    async with await server.get("/history?max_items=abc") as r:
        assert r.status == 400 and "max_items" in await r.text()
    async with await server.get("/history?max_items=-3") as r:
        assert r.status == 400
    async with await server.get("/no/such/route") as r:
        assert r.status == 404
    # still serving
    assert (await server.get_json("/prompt"))["exec_info"]["queue_remaining"] == 0


async def test_history_windowing_and_delete(server):
    ws = await server.connect()
    ids = []
    for i in range(5):
        r = await server.queue_prompt(chain(100 + i), client_id=ws.sid)
        ids.append(r["prompt_id"])
    for pid in ids:
        await server.wait_history(pid)
    assert list(await server.get_json("/history")) == ids
    assert list(await server.get_json("/history?max_items=2")) == ids[-2:]
    assert list(await server.get_json("/history?max_items=2&offset=1")) == ids[1:3]
    assert list(await server.get_json("/history?offset=3")) == ids[3:]
    assert list(await server.get_json("/api/history?max_items=0")) == []
    assert await server.get_json("/history/unknown-id") == {}
    async with await server.post("/history", json={"delete": [ids[0]]}) as r:
        assert r.status == 200
    assert list(await server.get_json("/history")) == ids[1:]
    async with await server.post("/history", json={"clear": True}) as r:
        assert r.status == 200
    assert await server.get_json("/history") == {}
    await ws.close()


async def test_queue_order_pause_resume_front_delete(server):
    ws = await server.connect()
    async with await server.post("/queue", json={"pause": True}) as r:
        assert r.status == 200
    q = await server.get_json("/queue")
    assert q["paused"] is True
    a = await server.queue_prompt(chain(1), client_id=ws.sid)
    b = await server.queue_prompt(chain(2), client_id=ws.sid)
    c = await server.queue_prompt(chain(3), client_id=ws.sid, front=True)
    d = await server.queue_prompt(chain(4), client_id=ws.sid, number=0.5)
    gone = await server.queue_prompt(chain(5), client_id=ws.sid)
    assert (a["number"], b["number"], c["number"], d["number"]) == (0, 1, -2, 0.5)
    # Nothing runs while paused: the execution order checked after resuming would show any prompt that did.
    q = await server.get_json("/queue")
    assert q["queue_running"] == []
    pending = [item[1] for item in q["queue_pending"]]
    assert pending == [c["prompt_id"], a["prompt_id"], d["prompt_id"], b["prompt_id"], gone["prompt_id"]]
    item = q["queue_pending"][0]
    assert len(item) == 5 and item[2]["4"]["class_type"] == "TestShow" and item[4] == ["4"]
    assert (await server.get_json("/prompt"))["exec_info"] == {"queue_remaining": 5, "paused": True}
    async with await server.post("/queue", json={"delete": [gone["prompt_id"]]}) as r:
        assert r.status == 200
    async with await server.post("/queue", json={"resume": True}) as r:
        assert r.status == 200
    order = []
    while len(order) < 4:
        msg = await ws.next_json()
        if msg["type"] == "execution_start":
            order.append(msg["data"]["prompt_id"])
    assert order == [c["prompt_id"], a["prompt_id"], d["prompt_id"], b["prompt_id"]]
    await ws.until_done(b["prompt_id"])
    assert gone["prompt_id"] not in await server.get_json("/history")
    # clear
    async with await server.post("/queue", json={"pause": True}) as r:
        assert r.status == 200
    await server.queue_prompt(chain(9))
    async with await server.post("/queue", json={"clear": True, "resume": True}) as r:
        assert r.status == 200
    assert (await server.get_json("/queue")) == {"queue_running": [], "queue_pending": [], "paused": False}
    await ws.close()


async def test_status_broadcast_and_routing_without_client_id(server):
    owner = await server.connect()
    other = await server.connect(features={"supports_preview_metadata": True}, extras=True)

    async def frames_until_marker(conn) -> list[dict]:
        """What `conn` got before a marker that every socket receives after all frames sent so far:
        pausing the queue broadcasts a status with paused set (then the queue is resumed)."""
        async with await server.post("/queue", json={"pause": True}) as resp:
            assert resp.status == 200
        got = []
        while (msg := await conn.next_json())["type"] != "status" or not msg["data"]["status"]["exec_info"]["paused"]:
            got.append(msg)
        async with await server.post("/queue", json={"resume": True}) as resp:
            assert resp.status == 200
        return got

    r = await server.queue_prompt(chain(7, steps=2, delay=0.01), client_id=owner.sid)
    await owner.until_done(r["prompt_id"])
    # the other client saw status broadcasts only, no events of the owner's prompt
    got = await frames_until_marker(other)
    assert got and {m["type"] for m in got} == {"status"}
    assert not any(kind == "binary" for kind, _ in other.events)

    # no client_id: per-node events are not sent; progress and previews are broadcast
    r2 = await server.queue_prompt(chain(8, steps=2, delay=0.01))
    entry = await server.wait_history(r2["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    seen = await frames_until_marker(other)
    kinds = {m["type"] for m in seen}
    assert "progress" in kinds and not kinds & {"executing", "executed", "execution_start", "execution_success"}
    frames = [b for kind, b in other.events if kind == "binary"]
    assert frames, "previews of a prompt without client_id go to every socket"
    kind, meta_len = struct.unpack(">II", frames[0][:8])
    assert kind == 4, "a client that advertised supports_preview_metadata gets type 4 frames"
    meta = json.loads(frames[0][8:8 + meta_len])
    assert meta["node_id"] == "2" and meta["prompt_id"] == r2["prompt_id"] and meta["image_type"] == "image/jpeg"
    assert Image.open(io.BytesIO(frames[0][8 + meta_len:])).format == "JPEG"
    await owner.close()
    await other.close()


async def test_feature_flags_and_reconnect(server):
    ws = await server.session.ws_connect(server.url + "/api/ws?clientId=abc")
    status = json.loads((await ws.receive(timeout=5)).data)
    # ComfyUI's greeting carries only queue_remaining; sdflow's editor opts in to its extras
    assert status == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}}
    extras = await server.session.ws_connect(server.url + "/api/ws?clientId=ed&extras=sdflow")
    greeting = json.loads((await extras.receive(timeout=5)).data)
    assert greeting["data"]["status"] == {"exec_info": {"queue_remaining": 0, "paused": False}}
    await extras.close()
    await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    reply = json.loads((await ws.receive(timeout=5)).data)
    assert reply == {"type": "feature_flags", "data": {"supports_preview_metadata": True,
                                                       "max_upload_size": 100 * 1024 * 1024}}
    assert await server.get_json("/features") == reply["data"]
    # a reconnect with the same id replaces the old socket
    ws2 = await server.session.ws_connect(server.url + "/ws?clientId=abc")
    await ws2.receive(timeout=5)
    closed = await ws.receive(timeout=5)
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # no clientId: the server makes one
    ws3 = await server.session.ws_connect(server.url + "/ws")
    sid = json.loads((await ws3.receive(timeout=5)).data)["data"]["sid"]
    assert len(sid) == 32
    for w in (ws, ws2, ws3):
        await w.close()


async def test_view_output_and_image_channels(server):
    ws = await server.connect()
    r = await server.queue_prompt(chain(40, out="TestSaveImage"), client_id=ws.sid)
    frames = await ws.until_done(r["prompt_id"])
    executed = next(f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "executed")
    image = executed["output"]["images"][0]
    async with await server.get("/view", params={"filename": image["filename"], "type": "output",
                                                 "subfolder": ""}) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Disposition"].startswith("inline;")
        img = Image.open(io.BytesIO(await resp.read()))
        assert img.getpixel((0, 0)) == (50, 7, 9)
    async with await server.get("/api/view", params={"filename": image["filename"] + " [output]",
                                                     "type": "input", "preview": "webp;80"}) as resp:
        assert resp.status == 200 and resp.content_type == "image/webp"
    async with await server.get("/view", params={"filename": image["filename"], "channel": "rgb"}) as resp:
        assert Image.open(io.BytesIO(await resp.read())).mode == "RGB"
    async with await server.get("/view", params={"filename": "missing.png"}) as resp:
        assert resp.status == 404
    async with await server.get("/view", params={"filename": image["filename"], "type": "bogus"}) as resp:
        assert resp.status == 400
    # anything that is not an allow-listed image is an attachment
    (server.config.output_dir / "page.html").write_text("<script>alert(1)</script>")
    (server.config.output_dir / "pic.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    for name in ("page.html", "pic.svg"):
        async with await server.get("/view", params={"filename": name}) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/octet-stream"
            assert resp.headers["Content-Disposition"].startswith("attachment;")
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    await ws.close()


def png_bytes(size=(12, 34), color=(1, 2, 3, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, format="PNG")
    return buf.getvalue()


def form(data: bytes, name: str = "up.png", **fields: str) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    fd.add_field("image", data, filename=name, content_type="image/png")
    for k, v in fields.items():
        fd.add_field(k, v)
    return fd


async def test_upload_then_load_image(server):
    async with await server.post("/upload/image", data=form(png_bytes((12, 34)))) as r:
        assert r.status == 200
        assert await r.json() == {"name": "up.png", "subfolder": "", "type": "input"}
    # identical bytes: reused; different bytes: renamed
    async with await server.post("/upload/image", data=form(png_bytes((12, 34)))) as r:
        assert (await r.json())["name"] == "up.png"
    async with await server.post("/upload/image", data=form(png_bytes((5, 6)))) as r:
        assert (await r.json())["name"] == "up (1).png"
    async with await server.post("/upload/image", data=form(png_bytes((7, 8)), overwrite="true")) as r:
        assert (await r.json())["name"] == "up.png"
    async with await server.post("/upload/image", data=form(png_bytes((9, 9)), subfolder="sub/dir")) as r:
        assert await r.json() == {"name": "up.png", "subfolder": "sub/dir", "type": "input"}
    assert (server.config.input_dir / "sub" / "dir" / "up.png").is_file()

    info = await server.get_json("/object_info/TestLoadImage")
    assert "up.png" in info["TestLoadImage"]["input"]["required"]["image"][0]
    ws = await server.connect()
    prompt = {"1": {"class_type": "TestLoadImage", "inputs": {"image": "up (1).png"}},
              "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    r = await server.queue_prompt(prompt, client_id=ws.sid)
    frames = await ws.until_done(r["prompt_id"])
    executed = next(f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "executed")
    assert executed["output"] == {"text": ["5006"]}
    # a widget file name outside the input dir is refused by validation (not in the list)
    bad = {"1": {"class_type": "TestLoadImage", "inputs": {"image": "../data/sdflow.db"}},
           "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    async with await server.post("/prompt", json={"prompt": bad}) as resp:
        assert resp.status == 400
    await ws.close()


async def test_upload_mask_merges_alpha(server):
    async with await server.post("/upload/image", data=form(png_bytes((4, 4), (200, 100, 50, 255)), "orig.png")) as r:
        assert r.status == 200
    mask = png_bytes((4, 4), (0, 0, 0, 17))
    ref = json.dumps({"filename": "orig.png", "subfolder": "", "type": "input"})
    async with await server.post("/upload/mask", data=form(mask, "mask.png", original_ref=ref)) as r:
        body = await r.json()
        assert r.status == 200, body
    with Image.open(server.config.input_dir / body["name"]) as img:
        assert img.getpixel((1, 1)) == (200, 100, 50, 17)


async def test_upload_size_limit(tmp_path):
    from .conftest import start_server
    srv, runner = await start_server(tmp_path, max_upload_mb=1)
    try:
        async with await srv.post("/upload/image", data=form(b"\x89PNG" + b"0" * (2 * 1024 * 1024))) as r:
            assert r.status == 413
        assert (await srv.get_json("/features"))["max_upload_size"] == 1024 * 1024
        assert not any(srv.config.input_dir.iterdir())
    finally:
        await srv.session.close()
        await runner.cleanup()


async def test_ui_format_workflow_is_accepted(server):
    object_info = await server.get_json("/object_info")
    ui = api_to_ui(chain(20), object_info)
    ws = await server.connect()
    r = await server.queue_prompt(ui, client_id=ws.sid)
    frames = await ws.until_done(r["prompt_id"])
    executed = next(f[1]["data"] for f in frames if f[0] == "json" and f[1]["type"] == "executed")
    assert executed["output"] == {"text": ["30"]}
    entry = await server.wait_history(r["prompt_id"])
    assert entry["prompt"][2]["3"]["class_type"] == "TestAdd"          # stored in API format
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"]["nodes"]     # the UI workflow kept for PNG metadata
    await ws.close()


async def test_info_routes(server):
    info = await server.get_json("/object_info")
    assert {"TestConst", "TestAdd", "TestSlow", "TestShow"} <= set(info)
    assert info["TestShow"]["output_node"] is True
    assert await server.get_json("/api/object_info/Nope") == {}
    assert await server.get_json("/models") == ["checkpoints", "embeddings"]
    assert await server.get_json("/models/checkpoints") == ["tiny.safetensors"]
    async with await server.get("/models/unknown") as r:
        assert r.status == 404
    assert await server.get_json("/embeddings") == ["emb1", "sub/emb2"]
    stats = await server.get_json("/api/system_stats")
    assert {"os", "ram_total", "ram_free", "python_version", "pytorch_version"} <= set(stats["system"])
    assert stats["devices"][0]["type"] in ("cpu", "cuda")
    assert {"entries", "bytes", "hits", "misses"} <= set(stats["cache"])
    assert await server.get_json("/extensions") == []
    doc = await server.get_json("/openapi.json")
    assert doc["openapi"].startswith("3.") and "/prompt" in doc["paths"] and "post" in doc["paths"]["/prompt"]
    assert "/workflows/{name}" in doc["paths"] and "/ws" in doc["paths"]
    entry = await server.wait_history((await server.queue_prompt(chain(1)))["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    assert (await server.get_json("/system_stats"))["cache"]["entries"] > 0
    async with await server.post("/free", json={"unload_models": True, "free_memory": True}) as r:
        assert r.status == 200

    async def cache_empty() -> bool:   # the worker frees between prompts, on its own thread
        return (await server.get_json("/system_stats"))["cache"]["entries"] == 0

    await until(cache_empty, what="the cache to be freed")


async def test_workflow_library(server):
    doc = {"last_node_id": 1, "nodes": [], "links": [], "version": 0.4}
    async with await server.post("/workflows/My flow (v2)", json=doc) as r:
        assert r.status == 200 and (await r.json())["name"] == "My flow (v2)"
    async with await server.post("/api/workflows/My flow (v2)?overwrite=false", json=doc) as r:
        assert r.status == 409
    listing = await server.get_json("/workflows")
    assert [w["name"] for w in listing] == ["My flow (v2)"]
    assert await server.get_json("/workflows/My flow (v2).json") == doc
    async with await server.session.delete(server.url + "/workflows/My flow (v2)") as r:
        assert r.status == 200
    assert await server.get_json("/workflows") == []
    async with await server.post("/workflows/x", data=b"[1]") as r:
        assert r.status == 400


async def test_saved_workflow_runs_headless_with_only_its_inputs(server):
    object_info = await server.get_json("/object_info")
    ui = api_to_ui(chain(1), object_info)
    for node in ui["nodes"]:
        if node["type"] == "TestAdd":
            node["title"] = "Offset"
    async with await server.post("/workflows/adder", json=ui) as r:
        assert r.status == 200
    # by node id and by title; the saved file is not changed
    async with await server.post("/api/workflows/adder/run", json={"inputs": {"1.value": 5, "Offset.b": 100}}) as r:
        assert r.status == 200, await r.text()
        pid = (await r.json())["prompt_id"]
    entry = await server.wait_history(pid)
    assert entry["outputs"]["4"] == {"text": ["105"]}
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"]["nodes"]       # the UI workflow kept for PNG metadata
    async with await server.post("/workflows/adder/run", json={"inputs": {"TestConst.value": 2}}) as r:  # by type
        entry = await server.wait_history((await r.json())["prompt_id"])
    assert entry["outputs"]["4"] == {"text": ["12"]}
    async with await server.post("/workflows/adder/run", json={}) as r:    # no inputs: the workflow as saved
        entry = await server.wait_history((await r.json())["prompt_id"])
    assert entry["outputs"]["4"] == {"text": ["11"]}
    # mistakes are 4xx with the reason
    async with await server.post("/workflows/adder/run", json={"inputs": {"Nope.b": 1}}) as r:
        assert r.status == 400 and "no node with id, title or type 'Nope'" in (await r.json())["error"]["details"]
    async with await server.post("/workflows/adder/run", json={"inputs": {"1.value": "x"}}) as r:
        body = await r.json()
        assert r.status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"
    async with await server.post("/workflows/missing/run", json={}) as r:
        assert r.status == 404


async def test_editor_root_without_build_explains_how(server):
    async with await server.get("/") as r:
        text = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert "make run" in text and "npm ci" in text and "npm run build" in text


async def test_editor_served_from_dist(tmp_path):
    from .conftest import start_server
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<html>editor</html>")
    (dist / "assets" / "app.js").write_text("console.log(1)")
    srv, runner = await start_server(tmp_path, web_root=dist)
    try:
        async with await srv.get("/") as r:
            assert "editor" in await r.text()
        async with await srv.get("/assets/app.js") as r:
            assert r.status == 200 and "console.log" in await r.text()
        async with await srv.get("/assets/missing.js") as r:
            assert r.status == 404
    finally:
        await srv.session.close()
        await runner.cleanup()


async def test_reconnect_mid_run_gets_current_node_then_global_interrupt(server):
    ws = await server.connect("owner-1")
    r = await server.queue_prompt(chain(1, steps=200, delay=0.02), client_id=ws.sid)
    while (await ws.next_json())["type"] != "progress":
        pass
    await ws.close()
    ws2 = await server.session.ws_connect(server.url + "/ws?clientId=owner-1")
    status = json.loads((await ws2.receive(timeout=5)).data)
    assert status["type"] == "status" and status["data"]["sid"] == "owner-1"
    current = json.loads((await ws2.receive(timeout=5)).data)
    assert current == {"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": r["prompt_id"]}}
    async with await server.post("/interrupt", data=b"") as resp:   # no body: global interrupt
        assert resp.status == 200
    entry = await server.wait_history(r["prompt_id"], timeout=10)
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    await ws2.close()


class BrokenCatalog:
    def folder_names(self):
        return ["checkpoints"]

    def list_files(self, folder):
        raise RuntimeError("disk on fire")


async def test_unexpected_errors_are_500_json_and_server_keeps_serving(tmp_path):
    from aiohttp import web

    from engine.config import RuntimeConfig
    from engine.registry import Registry
    from server.app import create_app
    from server.state import ServerOptions

    from . import plugin_nodes
    from .conftest import free_port

    port = free_port()
    app = create_app(RuntimeConfig(data_dir=tmp_path / "d"), Registry.from_nodes(plugin_nodes), BrokenCatalog(),
                     options=ServerOptions(port=port))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/models/checkpoints") as r:
                body = await r.json()
                assert r.status == 500 and body["error"]["type"] == "internal_error"
                assert "RuntimeError" in body["error"]["message"]
            async with s.get(f"http://127.0.0.1:{port}/api/prompt") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()


async def test_second_server_on_same_data_dir_is_refused(server):
    from aiohttp import web

    from engine.registry import Registry
    from server.app import DataDirBusy, create_app

    from . import plugin_nodes

    app = create_app(server.config, Registry.from_nodes(plugin_nodes))
    runner = web.AppRunner(app)
    try:
        with pytest.raises(DataDirBusy):
            await runner.setup()
    finally:
        await runner.cleanup()
    assert (await server.get_json("/prompt"))["exec_info"]["queue_remaining"] == 0


async def test_system_stats_answers_while_the_cache_lock_is_held(server):
    import asyncio
    import threading

    from server.state import STATE
    cache = server.app[STATE].executor.cache
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache._lock:
            holding.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert await asyncio.to_thread(holding.wait, 10)
        stats = await asyncio.wait_for(server.get_json("/system_stats"), 30)
        assert {"entries", "bytes", "hits"} <= set(stats["cache"])
    finally:
        release.set()
        holder.join()
