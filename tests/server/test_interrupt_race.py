"""An interrupt that arrives while a prompt is being claimed, before its execution starts, is not lost."""
from __future__ import annotations

import threading

from aiohttp import web

from engine.config import RuntimeConfig
from engine.executor import Executor
from engine.registry import Registry
from server.app import create_app
from server.state import ServerOptions

from . import plugin_nodes
from .conftest import Server, chain, free_port


class GatedExecutor(Executor):
    """A real executor that, for prompts whose id starts with 'gated', waits at the start of `execute` until
    the test opens the gate: the window between the worker's claim and the run's first node."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.reached = threading.Event()
        self.gate = threading.Event()

    def execute(self, prompt, prompt_id, **kw):
        if prompt_id.startswith("gated"):
            self.reached.set()
            assert self.gate.wait(30)
        return super().execute(prompt, prompt_id, **kw)


async def start(tmp_path):
    import aiohttp

    config = RuntimeConfig(data_dir=tmp_path / "data")
    registry = Registry.from_nodes(plugin_nodes)
    executor = GatedExecutor(registry, config=config)
    port = free_port()
    app = create_app(config, registry, None, executor=executor,
                     options=ServerOptions(port=port, web_root=tmp_path / "none"))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Server(f"http://127.0.0.1:{port}", port, config, aiohttp.ClientSession(), app), runner, executor


async def wait_event(event: threading.Event) -> None:
    import asyncio
    assert await asyncio.to_thread(event.wait, 30)


async def test_interrupt_between_claim_and_start_is_kept(tmp_path):
    srv, runner, ex = await start(tmp_path)
    try:
        for body in ({"prompt_id": "gated-1"}, {}):            # by id, and the global form
            ex.reached.clear()
            ex.gate.clear()
            pid = body.get("prompt_id", "gated-2")
            await srv.queue_prompt(chain(1, steps=200, delay=0.01), prompt_id=pid)
            await wait_event(ex.reached)                         # claimed, execution not started
            async with await srv.post("/interrupt", json=body) as r:
                assert r.status == 200
            ex.gate.set()
            entry = await srv.wait_history(pid)
            kinds = [m[0] for m in entry["status"]["messages"]]
            assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
        # the next prompt is not touched by the old interrupts
        data = await srv.queue_prompt(chain(3))
        entry = await srv.wait_history(data["prompt_id"])
        assert entry["status"]["status_str"] == "success"
    finally:
        ex.gate.set()
        await srv.session.close()
        await runner.cleanup()


def test_executor_keeps_an_interrupt_sent_before_the_prompt_starts():
    from tests.engine import toy_nodes as t

    ex = Executor(Registry.from_nodes(t))
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    ex.interrupt("early")
    assert ex.execute(prompt, "early").status == "interrupted"
    assert ex.execute(prompt, "early-2").status == "success"     # keyed: other prompts run
    assert ex.execute(prompt, "early").status == "success"       # consumed by the run it stopped
    ex.interrupt()                                               # nothing running: no effect later
    assert ex.execute(prompt, "later").status == "success"
