"""Custom-node packs written in the shapes of real ones (tests/custom_nodes/packs), loaded by a real
`sdflow run` and a real `sdflow serve` (separate processes: packs are imported into the process for good):
helper modules imported at load time, a pack failing to import beside ones that load, any-type and
any-input tricks, lazy inputs, list outputs, node expansion, execution blocking, a pack route and model
folder, built-in nodes called by ComfyUI's method names on the tiny SD1 checkpoint, and IS_CHANGED caching."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKS = Path(__file__).resolve().parent / "packs"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from nodes.models.tiny import write_demo_checkpoint

    data = tmp_path_factory.mktemp("cn") / "data"
    write_demo_checkpoint(data / "models")
    (data / "models" / "helper_models").mkdir(parents=True)
    (data / "models" / "helper_models" / "thing.bin").write_bytes(b"\0")
    return data


def sdflow(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def ui_lines(stderr: str) -> dict[str, dict]:
    """`node N key: json` lines of `sdflow run` as {node: {key: value}}."""
    out: dict[str, dict] = {}
    for line in stderr.splitlines():
        if line.startswith("node "):
            head, _, value = line.partition(": ")
            _, nid, key = head.split(" ")
            out.setdefault(nid, {})[key] = json.loads(value)
    return out


GRAPH = {
    "1": {"class_type": "HelperInfo", "inputs": {"sampler": "euler", "size": 32}},
    "2": {"class_type": "SimpleConcat", "inputs": {"a": "p", "b": "q"}},
    "3": {"class_type": "HelperNumber", "inputs": {"value": 5}},
    "4": {"class_type": "HelperNumber", "inputs": {"value": 7}},
    "5": {"class_type": "HelperLazySwitch", "inputs": {"use_a": False, "a": ["3", 0], "b": ["4", 0]}},
    "6": {"class_type": "HelperDouble", "inputs": {"value": 21}},
    "7": {"class_type": "HelperListMaker", "inputs": {"count": 4}},
    "8": {"class_type": "HelperShowInts", "inputs": {"values": ["7", 0]}},
    "9": {"class_type": "HelperCountInputs", "inputs": {"p": ["5", 0], "q": ["6", 0], "r": 100}},
    "10": {"class_type": "HelperAny", "inputs": {"anything": ["9", 0]}},
    "11": {"class_type": "HelperShowInts", "inputs": {"values": ["10", 0]}},
}


def test_sdflow_run_loads_packs_and_runs_their_nodes(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS))
    assert done.returncode == 0, done.stderr
    # the import report: the broken pack named with its error, the others with their node counts
    assert "broken_pack: IMPORT FAILED: ModuleNotFoundError" in done.stderr
    assert "helpers_pack: 11 node(s)" in done.stderr and "simple_pack: 1 node(s)" in done.stderr
    ui = ui_lines(done.stderr)
    info = ui["1"]["text"]
    assert info[0] == "euler" and info[1] == "cpu"
    assert info[2] == "(1, 3, 32, 32)"                      # comfy.utils.common_upscale
    assert info[3] == "{'a': 1, 'strength': 0.5}"           # node_helpers.conditioning_set_values
    assert info[4] == "thing.bin"                           # the pack's own model folder
    assert info[5] == "comfy.sd.load_checkpoint_guess_config is not supported by sdflow"
    assert info[6] == "True"                                # nodes.NODE_CLASS_MAPPINGS has the built-ins
    assert ui["2"]["text"] == ["pq"]
    assert ui["8"]["values"] == ["[1, 2, 3, 4]"]            # a list output, taken whole by INPUT_IS_LIST
    # lazy switch took b (7), expansion doubled 21, plus the constant 100, through an any-type passthrough
    assert ui["11"]["values"] == ["[149]"]
    assert "> 3 HelperNumber" not in done.stderr            # the lazy branch not asked for never ran
    assert "> 6.1." in done.stderr                          # the expanded nodes ran under prefixed ids


V3_GRAPH = {
    "1": {"class_type": "V3Add", "inputs": {"a": 40, "b": 2}},
    "2": {"class_type": "V3Add", "inputs": {"a": 1}},
    "3": {"class_type": "V3Pick", "inputs": {"first": False, "x": ["1", 0], "y": ["2", 0]}},
    "4": {"class_type": "V3Show", "inputs": {"value": ["3", 0], "mode": "loud"}},
    "5": {"class_type": "V3Show", "inputs": {"value": ["1", 0], "mode": "plain"}},
}


def test_v3_schema_nodes_from_comfy_entrypoint(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(V3_GRAPH))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS))
    assert done.returncode == 0, done.stderr
    assert "v3_pack: 4 node(s)" in done.stderr
    ui = ui_lines(done.stderr)
    assert ui["5"]["text"] == ["42", "5"]        # async execute; the optional input; hidden unique_id
    assert ui["4"]["text"] == ["1!", "4"]        # the lazy pick took y (V3Add with b's default of 0)
    bad = dict(V3_GRAPH, **{"1": {"class_type": "V3Add", "inputs": {"a": 400, "b": 2}}})
    wf.write_text(json.dumps(bad))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS))
    assert done.returncode == 1 and "node 1 (V3Add)" in done.stderr and "400" in done.stderr


def test_disable_all_custom_nodes(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"2": GRAPH["2"]}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS),
                  "--disable-all-custom-nodes")
    assert done.returncode == 1
    assert "SimpleConcat does not exist" in done.stderr and "custom nodes:" not in done.stderr


def test_execution_blocker(data_dir: Path, tmp_path: Path) -> None:
    graph = {"1": {"class_type": "HelperNumber", "inputs": {"value": 3}},
             "2": {"class_type": "HelperMaybeBlock", "inputs": {"value": ["1", 0], "block": True, "message": ""}},
             "3": {"class_type": "HelperShowInts", "inputs": {"values": ["2", 0]}},
             "4": {"class_type": "SimpleConcat", "inputs": {"a": "still", "b": "runs"}}}
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS))
    assert done.returncode == 0, done.stderr
    ui = ui_lines(done.stderr)
    assert "3" not in ui and ui["4"]["text"] == ["stillruns"]   # the blocked output node shows nothing
    graph["2"]["inputs"]["message"] = "blocked on purpose"
    wf.write_text(json.dumps(graph))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS))
    assert done.returncode == 2
    assert "error in node 3 (HelperShowInts)" in done.stderr and "blocked on purpose" in done.stderr


def test_pack_calls_builtin_nodes_by_comfyui_names(data_dir: Path, tmp_path: Path) -> None:
    from nodes.models.tiny import DEMO_NAME

    graph = {"1": {"class_type": "HelperTxt2Img", "inputs": {"ckpt_name": DEMO_NAME, "text": "a cat", "seed": 1}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "pack"}}}
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(PACKS))
    assert done.returncode == 0, done.stderr
    paths = [line for line in done.stdout.splitlines() if line.endswith(".png")]
    assert len(paths) == 1 and Path(paths[0]).is_file()
    from PIL import Image
    with Image.open(paths[0]) as img:
        assert img.size == (64, 64)


# ---- through a real server -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served(data_dir: Path, tmp_path: Path):
    port = free_port()
    data = tmp_path / "srv"
    data.mkdir()
    (data / "models").symlink_to(data_dir / "models")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), "--data-dir", str(data),
                             "--custom-nodes", str(PACKS), "--web-root", str(tmp_path / "none")],
                            cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"server did not start: {log.read()}")
                time.sleep(0.1)   # polling for the port, with a deadline
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


async def wait_history(session: aiohttp.ClientSession, base: str, pid: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        async with session.get(f"{base}/history/{pid}") as r:
            doc = await r.json()
        if pid in doc and doc[pid]["status"].get("completed") is not None:
            return doc[pid]
        await asyncio.sleep(0.05)
    raise AssertionError(f"prompt {pid} did not finish")


async def test_server_with_packs(served) -> None:
    base, log = served
    log.seek(0)
    assert "broken_pack: IMPORT FAILED" in log.read()
    sid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/custom_nodes") as r:
            packs = {p["name"]: p for p in await r.json()}
        assert packs["broken_pack"]["error"].startswith("ModuleNotFoundError")
        assert "HelperTxt2Img" in packs["helpers_pack"]["nodes"] and packs["simple_pack"]["error"] is None
        async with session.get(f"{base}/extensions") as r:
            assert await r.json() == ["/extensions/helpers_pack/hello.js"]
        async with session.get(f"{base}/extensions/helpers_pack/hello.js") as r:
            assert r.status == 200 and "helpers_pack extension" in await r.text()
            assert r.headers["Content-Type"].startswith("application/javascript")
        async with session.get(f"{base}/extensions/helpers_pack/../__init__.py") as r:
            assert r.status == 404
        async with session.get(f"{base}/helpers_pack/hello") as r:   # the route the pack added
            assert await r.json() == {"hello": "from the pack", "files": ["thing.bin"]}
        async with session.get(f"{base}/object_info/HelperInfo") as r:
            info = (await r.json())["HelperInfo"]
        assert info["display_name"] == "Helper info" and "euler" in info["input"]["required"]["sampler"][0]
        async with session.get(f"{base}/object_info/V3Add") as r:
            v3 = (await r.json())["V3Add"]
        assert v3["display_name"] == "Add (V3)" and v3["output_name"] == ["sum"]
        assert v3["input"]["required"]["a"][1]["max"] == 100 and "b" in v3["input"]["optional"]

        ws = await session.ws_connect(f"{base}/ws?clientId={sid}")
        custom: list[dict] = []

        async def run(graph: dict) -> dict:
            async with session.post(f"{base}/prompt", json={"prompt": graph, "client_id": sid}) as r:
                body = await r.json()
                assert r.status == 200, body
            pid = body["prompt_id"]
            while True:   # the pack's send_sync event reaches the prompt's client
                msg = await asyncio.wait_for(ws.receive_json(), 60)
                if msg["type"] == "helpers_pack.info":
                    custom.append(msg["data"])
                if msg["type"] == "executing" and msg["data"]["node"] is None and \
                        msg["data"].get("prompt_id") == pid:
                    break
            return await wait_history(session, base, pid)

        first = await run({"1": {"class_type": "HelperChanging", "inputs": {"key": "a", "always": False}}})
        again = await run({"1": {"class_type": "HelperChanging", "inputs": {"key": "a", "always": False}}})
        changed = await run({"1": {"class_type": "HelperChanging", "inputs": {"key": "b", "always": False}}})
        nan1 = await run({"1": {"class_type": "HelperChanging", "inputs": {"key": "c", "always": True}}})
        nan2 = await run({"1": {"class_type": "HelperChanging", "inputs": {"key": "c", "always": True}}})
        runs = [h["outputs"]["1"]["runs"][0] for h in (first, again, changed, nan1, nan2)]
        assert runs == [1, 1, 2, 3, 4]     # same IS_CHANGED value: cached; new value or NaN: runs again
        stamps = []
        watched = log.name + ".watched"
        for content in ("one", "one", "two"):
            Path(watched).write_text(content)
            h = await run({"1": {"class_type": "V3Stamp", "inputs": {"key": watched, "note": "n"}}})
            stamps.append(h["outputs"]["1"]["runs"][0])
        assert stamps == [1, 1, 2]         # V3 fingerprint_inputs: same prompt, changed file -> runs again
        info_run = await run({"1": GRAPH["1"]})
        assert info_run["status"]["status_str"] == "success"
        assert custom == [{"sampler": "euler", "to": sid}]   # PromptServer.instance.client_id: the prompt's
        await ws.close()
