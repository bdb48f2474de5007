"""The Ray backend with the small test nodes: the same websocket messages as the embedded executor,
interrupt of the worker that runs a prompt, a worker SIGKILLed mid-run, a worker that cannot start."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from engine.config import RuntimeConfig
from engine.registry import Registry
from server.state import STATE
from tests.server import plugin_nodes
from tests.server.conftest import chain, start_server

from .conftest import backend, ray, start_ray_server, wait_until

MODULE = "tests.server.plugin_nodes"


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "timestamp"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def comparable(frames: list) -> list:
    """The frames of one prompt without what depends on timing: queue `status` broadcasts, coalesced
    `progress_state` frames, timestamps."""
    out = []
    for kind, msg in frames:
        if kind == "binary":
            out.append(("binary", msg))
        elif msg["type"] not in ("status", "progress_state"):
            out.append((msg["type"], _plain(msg["data"])))
    return out


@pytest.fixture
async def ray_server(ray_cluster, tmp_path):
    config = RuntimeConfig(data_dir=tmp_path / "ray-data")
    config.ensure_dirs()
    srv, runner = await start_ray_server(tmp_path, Registry.from_nodes(plugin_nodes), config, node_modules=[MODULE])
    try:
        yield srv
    finally:
        await srv.session.close()
        await runner.cleanup()


async def run_once(srv, prompt: dict, prompt_id: str, client_id: str) -> list:
    ws = await srv.connect(client_id)
    try:
        await srv.queue_prompt(prompt, client_id=client_id, prompt_id=prompt_id)
        return await ws.until_done(prompt_id, timeout=60)
    finally:
        await ws.close()


async def test_events_match_the_embedded_executor(ray_server, tmp_path):
    prompt = chain(value=5, steps=3, delay=0.01)
    embedded, runner = await start_server(tmp_path / "embedded")
    try:
        expected = comparable(await run_once(embedded, prompt, "same-prompt", "client-1"))
    finally:
        await embedded.session.close()
        await runner.cleanup()
    got = comparable(await run_once(ray_server, prompt, "same-prompt", "client-1"))
    assert [f[0] for f in expected].count("binary") == 3       # a preview per step of TestSlow
    assert got == expected
    entry = await ray_server.wait_history("same-prompt")
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["4"] == {"text": ["15"]}
    assert entry["dispatch"]["worker"] in {s.name for s in backend(ray_server).slots}


async def test_interrupt_reaches_the_worker_running_the_prompt(ray_server):
    ws = await ray_server.connect("client-2")
    try:
        slow = await ray_server.queue_prompt(chain(value=1, steps=400, delay=0.05), client_id="client-2")
        pid = slow["prompt_id"]
        while True:   # the sampler-like loop is running on a worker
            msg = await ws.next_json(timeout=60)
            if msg["type"] == "progress" and msg["data"]["prompt_id"] == pid:
                break
        async with await ray_server.post("/interrupt", json={"prompt_id": pid}) as r:
            assert r.status == 200
        frames = await ws.until_done(pid, timeout=30)
        kinds = [m["type"] for k, m in frames if k == "json"]
        assert "execution_interrupted" in kinds and "execution_success" not in kinds
        entry = await ray_server.wait_history(pid)
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        # the worker is free again and runs the next prompt
        quick = await ray_server.queue_prompt(chain(value=2), client_id="client-2")
        await ws.until_done(quick["prompt_id"], timeout=60)
        assert (await ray_server.wait_history(quick["prompt_id"]))["status"]["status_str"] == "success"
    finally:
        await ws.close()


async def test_sigkill_of_a_worker_mid_run_reruns_the_prompt_and_loses_nothing(ray_server):
    be = backend(ray_server)
    ws = await ray_server.connect("client-3")
    try:
        slow = (await ray_server.queue_prompt(chain(value=7, steps=60, delay=0.05), client_id="client-3"))["prompt_id"]
        others = [(await ray_server.queue_prompt(chain(value=v), client_id="client-3"))["prompt_id"] for v in (8, 9)]
        while True:
            msg = await ws.next_json(timeout=60)
            if msg["type"] == "progress" and msg["data"]["prompt_id"] == slow:
                break
        victim = be._running[slow][1]
        old_pid = victim.info["pid"]
        os.kill(old_pid, signal.SIGKILL)

        entry = await ray_server.wait_history(slow, timeout=90)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert entry["outputs"]["4"] == {"text": ["17"]}
        first, second = entry["dispatch"]["attempts"]
        assert first["worker"] == victim.name and first["failure"]
        assert second["worker"] != victim.name and "re-run" in second["reason"]
        for pid, value in zip(others, (8, 9)):
            other = await ray_server.wait_history(pid, timeout=60)
            assert other["status"]["status_str"] == "success" and other["outputs"]["4"] == {"text": [str(value + 10)]}
        assert (await ray_server.get_json("/queue")) == {"queue_running": [], "queue_pending": [], "paused": False}

        # the killed worker comes back as a new process with an empty cache, and serves again
        await wait_until(lambda: victim.state == "idle", timeout=90, what="the worker's restart")
        assert victim.info["pid"] != old_pid
        stats = await asyncio.to_thread(ray.get, victim.actor.stats.remote())
        assert stats["entries"] == 0
        for slot in be.slots:   # pin the next prompt to the restarted worker: make it the only idle one
            if slot is not victim:
                slot.state = "busy"
        again = (await ray_server.queue_prompt(chain(value=3), client_id="client-3"))["prompt_id"]
        entry = await ray_server.wait_history(again, timeout=60)
        assert entry["status"]["status_str"] == "success" and entry["dispatch"]["worker"] == victim.name
    finally:
        for slot in be.slots:
            if slot.state == "busy" and not any(s is slot for _, s in be._running.values()):
                slot.state = "idle"
        await ws.close()


async def test_a_prompt_nobody_watches_streams_no_progress_until_a_watcher_connects(ray_server):
    be = backend(ray_server)

    async def streamed(prompt_id: str, watch: bool) -> tuple[dict, int]:
        before = {s.name: s.events for s in be.slots}
        ws = await ray_server.connect("watcher") if watch else None
        try:
            await ray_server.queue_prompt(chain(value=4, steps=20, delay=0.0), client_id="watcher",
                                          prompt_id=prompt_id)
            entry = await ray_server.wait_history(prompt_id, timeout=60)
        finally:
            if ws is not None:
                await ws.close()
                await wait_until(lambda: "watcher" not in ray_server.app[STATE].hub.clients, what="disconnect")
        slot = next(s for s in be.slots if s.name == entry["dispatch"]["worker"])
        return entry, slot.events - before[slot.name]

    watched, watched_events = await streamed("watched-run", True)
    alone, alone_events = await streamed("unwatched-run", False)
    assert watched["outputs"]["4"] == alone["outputs"]["4"] == {"text": ["14"]}
    assert watched_events >= 20 + 4      # a progress event per step, an executing event per node
    assert alone_events < 10             # start, cached/executed and success only

    # a watcher that connects while its prompt runs gets the progress from then on
    pid = (await ray_server.queue_prompt(chain(value=5, steps=400, delay=0.05), client_id="late"))["prompt_id"]
    await wait_until(lambda: pid in be._running, what="the prompt to start on a worker")
    ws = await ray_server.connect("late")
    try:
        while True:
            msg = await ws.next_json(timeout=60)
            if msg["type"] == "progress" and msg["data"]["prompt_id"] == pid:
                break
        async with await ray_server.post("/interrupt", json={"prompt_id": pid}) as r:
            assert r.status == 200
        await ws.until_done(pid, timeout=30)
    finally:
        await ws.close()
    assert (await ray_server.wait_history(pid))["status"]["messages"][-1][0] == "execution_interrupted"


def test_a_worker_that_cannot_start_is_reported_with_its_reason(ray_cluster, tmp_path):
    from server.ray_backend import RayBackendError, RayCluster, WorkerSpec

    spec = WorkerSpec.from_config(RuntimeConfig(data_dir=tmp_path), builtin_nodes=False,
                                  node_modules=["tests.ray.no_such_nodes"])
    with pytest.raises(RayBackendError) as info:
        RayCluster(spec, workers=1, start_timeout=60)
    assert "worker-0" in str(info.value) and "tests.ray.no_such_nodes" in str(info.value)


def test_cli_options_and_worker_command():
    from server.cli import build_parser
    from server.ray_backend import SLOT_RESOURCE, worker_node_command

    args = build_parser().parse_args(["serve", "--backend", "ray", "--ray-address", "10.0.0.1:6379", "--workers", "2"])
    assert (args.backend, args.ray_address, args.workers) == ("ray", "10.0.0.1:6379", 2)
    assert build_parser().parse_args(["serve"]).backend == "embedded"
    args = build_parser().parse_args(["worker", "--ray-address", "10.0.0.1:6379", "--workers", "3"])
    cmd = worker_node_command(args.ray_address, args.workers)
    assert cmd[1:4] == ["start", "--address=10.0.0.1:6379", "--block"]
    assert cmd[4] == f'--resources={{"{SLOT_RESOURCE}": 3}}'


async def test_a_prompt_whose_rerun_dies_too_gets_a_clear_execution_error(ray_server):
    be = backend(ray_server)
    ws = await ray_server.connect("client-4")
    try:
        slow = (await ray_server.queue_prompt(chain(value=4, steps=200, delay=0.05), client_id="client-4"))["prompt_id"]
        killed = []
        error = None
        while error is None:
            msg = await ws.next_json(timeout=90)
            data = msg["data"]
            if msg["type"] == "progress" and data["prompt_id"] == slow and len(killed) < 2:
                running = be._running.get(slow)     # None between the failure and the re-run's start
                slot = running[1] if running else None
                if slot is not None and slot.name not in killed:   # the first run, then the re-run
                    killed.append(slot.name)
                    os.kill(slot.info["pid"], signal.SIGKILL)
            elif msg["type"] == "execution_error" and data["prompt_id"] == slow:
                error = data
        assert len(set(killed)) == 2
        assert error["exception_type"] == "WorkerDied"
        assert killed[0] in error["exception_message"] and killed[1] in error["exception_message"]
        await ws.until_done(slow, timeout=30)
        entry = await ray_server.wait_history(slow)
        assert entry["status"]["status_str"] == "error" and len(entry["dispatch"]["attempts"]) == 2
        # both workers come back and the server keeps serving
        await wait_until(lambda: all(s.state == "idle" for s in be.slots), timeout=90, what="both restarts")
        again = (await ray_server.queue_prompt(chain(value=6), client_id="client-4"))["prompt_id"]
        assert (await ray_server.wait_history(again, timeout=60))["outputs"]["4"] == {"text": ["16"]}
    finally:
        await ws.close()


def test_a_joining_node_asks_for_token_auth_when_it_has_a_token(tmp_path):
    from server.ray_backend import worker_node_env

    token = tmp_path / "auth_token"
    token.write_text("x" * 64)
    assert worker_node_env({"RAY_AUTH_TOKEN_PATH": str(token)})["RAY_AUTH_MODE"] == "token"
    chosen = {"RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "disabled"}
    assert worker_node_env(chosen)["RAY_AUTH_MODE"] == "disabled"
