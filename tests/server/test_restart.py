"""Durability: SIGKILL a real `sdflow serve` subprocess mid-run and start it again on the same data dir."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.waiting import until

from .conftest import chain, free_port

ROOT = Path(__file__).resolve().parents[2]


def spawn(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, SDFLOW_TEST_INPUT_DIR=str(data_dir / "input"),
               SDFLOW_TEST_OUTPUT_DIR=str(data_dir / "output"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--no-builtin-nodes", "--nodes-module", "tests.server.plugin_nodes"]
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def wait_up(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen, log_path: Path) -> None:
    async def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            async with session.get(url + "/prompt") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await until(up, timeout=60, interval=0.1, what="the server to answer")
    except AssertionError as e:
        raise AssertionError(f"{e}: {log_path.read_text()[-3000:]}") from None


async def post_prompt(session: aiohttp.ClientSession, url: str, prompt: dict, client_id: str | None = None) -> dict:
    body = {"prompt": prompt} | ({"client_id": client_id} if client_id else {})
    async with session.post(url + "/prompt", json=body) as r:
        body = await r.json()
        assert r.status == 200, body
        return body


async def history(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/history") as r:
        return await r.json()


@pytest.mark.slow
async def test_sigkill_mid_run_then_restart(tmp_path):
    data = tmp_path / "data"
    log_path = tmp_path / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(data, port, log_path)
    async with aiohttp.ClientSession() as session:
        try:
            await wait_up(session, url, proc, log_path)
            done = await post_prompt(session, url, chain(1))

            async def done_in_history() -> bool:
                return done["prompt_id"] in await history(session, url)

            await until(done_in_history, what="the first prompt in the history")
            before = await history(session, url)
            assert before[done["prompt_id"]]["status"]["status_str"] == "success"

            ws = await session.ws_connect(url + "/ws?clientId=watcher")
            killed = await post_prompt(session, url, chain(2, steps=400, delay=0.05), "watcher")  # ~20 s
            pending = [await post_prompt(session, url, chain(10 + i, steps=2, delay=0.01)) for i in range(3)]
            # Killed mid-run: once its slow node reports progress (the store marks a prompt running first).
            while True:
                msg = await ws.receive(timeout=60)
                if msg.type == aiohttp.WSMsgType.BINARY:   # a preview
                    continue
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                frame = json.loads(msg.data)
                if frame["type"] == "progress" and frame["data"].get("prompt_id") == killed["prompt_id"]:
                    break
            await ws.close()
            async with session.get(url + "/queue") as r:
                assert (await r.json())["queue_running"][0][1] == killed["prompt_id"]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

        proc = spawn(data, port, log_path)
        try:
            await wait_up(session, url, proc, log_path)

            async def pending_done() -> dict | None:
                hist = await history(session, url)
                return hist if all(p["prompt_id"] in hist for p in pending) else None

            hist = await until(pending_done, what="the pending prompts to run after the restart")
            # history intact: the entry from before the crash is unchanged
            assert hist[done["prompt_id"]] == before[done["prompt_id"]]
            # the killed one is failed with a clear reason
            entry = hist[killed["prompt_id"]]
            assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
            message = entry["status"]["messages"][-1][1]["exception_message"]
            assert "server stopped while this prompt was running" in message
            assert entry["prompt"][1] == killed["prompt_id"] and entry["prompt"][2]["2"]["class_type"] == "TestSlow"
            # the pending ones ran, in queue order, successfully
            order = [pid for pid in hist if pid in {p["prompt_id"] for p in pending}]
            assert order == [p["prompt_id"] for p in pending]
            for i, p in enumerate(pending):
                assert hist[p["prompt_id"]]["outputs"]["4"] == {"text": [str(20 + i)]}
            # numbering continues after the restart
            again = await post_prompt(session, url, chain(99))
            assert again["number"] > pending[-1]["number"]

            async def again_done() -> bool:
                return again["prompt_id"] in await history(session, url)

            await until(again_done, what="the restarted server to run a new prompt")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert "marked failed" in log_path.read_text()
