"""The event loop never waits on SQLite: while another thread holds the store's lock (the worker finishing
a prompt and trimming history), status reads answer and queued requests complete once it is released."""
from __future__ import annotations

import asyncio
import threading

from .conftest import chain


async def test_loop_answers_while_the_store_is_locked(server):
    from server.state import STATE

    store = server.app[STATE].store
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._tx():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 30)
        writes = [asyncio.ensure_future(server.post("/prompt", json={"prompt": chain(1)})),
                  asyncio.ensure_future(server.post("/queue", json={"delete": ["x"]})),
                  asyncio.ensure_future(server.post("/history", json={"delete": ["x"]}))]
        ws = await asyncio.wait_for(server.connect(), 30)      # the status frame needs queue_remaining
        for path in ("/prompt", "/features", "/object_info/TestConst"):
            async with await asyncio.wait_for(server.get(path), 30) as r:
                assert r.status == 200, path
        assert not any(w.done() for w in writes)               # they wait in threads, not on the loop
    finally:
        release.set()
        holder.join(30)
    for w in writes:
        r = await asyncio.wait_for(w, 30)
        assert r.status == 200, await r.text()
        r.release()
    await ws.close()
    assert store.queue_remaining() in (0, 1)                   # counted without SQLite on the loop
