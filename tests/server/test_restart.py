"""Durability: SIGKILL a real `sdflow serve` subprocess mid-run and start it again on the same data dir."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

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
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            async with session.get(url + "/prompt") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"server did not start: {log_path.read_text()[-3000:]}")


async def post_prompt(session: aiohttp.ClientSession, url: str, prompt: dict) -> dict:
    async with session.post(url + "/prompt", json={"prompt": prompt}) as r:
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
            for _ in range(100):
                if done["prompt_id"] in await history(session, url):
                    break
                await asyncio.sleep(0.05)
            before = await history(session, url)
            assert before[done["prompt_id"]]["status"]["status_str"] == "success"

            killed = await post_prompt(session, url, chain(2, steps=400, delay=0.05))   # ~20 s: killed mid-run
            pending = [await post_prompt(session, url, chain(10 + i, steps=2, delay=0.01)) for i in range(3)]
            for _ in range(200):
                async with session.get(url + "/queue") as r:
                    q = await r.json()
                if q["queue_running"] and q["queue_running"][0][1] == killed["prompt_id"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the slow prompt never started")
            await asyncio.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

        proc = spawn(data, port, log_path)
        try:
            await wait_up(session, url, proc, log_path)
            for _ in range(300):
                hist = await history(session, url)
                if all(p["prompt_id"] in hist for p in pending):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"pending prompts did not run after restart: {list(hist)}")
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
            for _ in range(100):
                if again["prompt_id"] in await history(session, url):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the restarted server does not run new prompts")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert "marked failed" in log_path.read_text()
