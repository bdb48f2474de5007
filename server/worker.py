"""The one worker thread: takes prompts from the durable queue in order and runs them with the executor.

The HTTP side only writes to the store and wakes this thread; it never waits for an execution. Events
from the executor are encoded here (previews become JPEG in this thread, not on the event loop) and
handed to the hub on the loop. The history entry is committed before the completion signal
(`executing {node: null}`) goes out, so a client that reacts to it by fetching `/history` finds it.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from engine.events import Event
from engine.store import QueueItem, Store, failed_entry, history_entry

from .ws import Hub, encode_preview

log = logging.getLogger("sdflow.server")


class ProgressStates:
    """Builds ComfyUI's `progress_state` frames from the executor's event stream: every node that left
    'pending' with its state ("running", "finished", "error"), value and max. One per prompt.

    Each frame holds every started node, so a frame per event would cost O(n^2) for big graphs: updates
    only mark the state dirty, one send is scheduled at a time, and it carries the latest state."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict] = {}
        self.current: str | None = None
        self.lock = threading.Lock()
        self.scheduled = False

    def update(self, event: Event) -> bool:
        """Apply one event; True when it changed the state."""
        kind, data = event.type, event.data
        with self.lock:
            if kind == "executing":
                self._finish_current()
                node = data.get("node")
                if node is None:
                    return False
                self.current = node
                self._set(node, "running", 0, 1)
            elif kind == "progress" and data.get("node"):
                self._set(data["node"], "running", data.get("value", 0), data.get("max", 1))
            elif kind == "execution_success":
                self._finish_current()
            elif kind in ("execution_error", "execution_interrupted") and data.get("node_id") in self.nodes:
                if kind == "execution_error":
                    self.nodes[data["node_id"]]["state"] = "error"
                self.current = None
            else:
                return False
            return True

    def take_schedule(self) -> bool:
        """True if the caller should schedule a send (none is pending yet)."""
        with self.lock:
            if self.scheduled:
                return False
            self.scheduled = True
            return True

    def frame(self) -> dict:
        with self.lock:
            self.scheduled = False
            return {"prompt_id": self.prompt_id, "nodes": {k: dict(v) for k, v in self.nodes.items()}}

    def _finish_current(self) -> None:
        if self.current is not None and self.current in self.nodes:
            entry = self.nodes[self.current]
            entry.update(state="finished", value=entry["max"])
        self.current = None

    def _set(self, node: str, state: str, value: float, maximum: float) -> None:
        self.nodes[node] = {"value": value, "max": maximum, "state": state, "node_id": node,
                            "prompt_id": self.prompt_id, "display_node_id": node, "parent_node_id": None,
                            "real_node_id": node}


class Worker:
    def __init__(self, store: Store, executor: Any, hub: Hub, *, preview_size: int = 512,
                 on_queue_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.executor = executor
        self.hub = hub
        self.preview_size = preview_size
        self.on_queue_change = on_queue_change or (lambda: None)
        self._cond = threading.Condition()
        self._stop = False
        self._free: dict[str, bool] = {}
        self._thread: threading.Thread | None = None
        self.paused = store.paused
        self.running: QueueItem | None = None
        # Claiming a prompt and naming it `running` happen under this lock, so an interrupt can never fall
        # between the two (it would be answered 200 and lost).
        self._claim_lock = threading.Lock()
        self.completed = 0

    # ---- control (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sdflow-worker", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def set_paused(self, paused: bool) -> None:
        self.store.set_paused(paused)
        self.paused = paused
        self.notify()

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        with self._cond:
            self._free["unload_models"] = self._free.get("unload_models", False) or unload_models
            self._free["free_memory"] = self._free.get("free_memory", False) or free_memory
            self._cond.notify_all()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Global interrupt, or only if `prompt_id` is the running prompt (ComfyUI's rule)."""
        with self._claim_lock:
            running = self.running
            if running is None or (prompt_id is not None and running.prompt_id != prompt_id):
                return False
            # keyed by id: it holds even if the executor has not started this prompt yet
            self.executor.interrupt(running.prompt_id)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.running is not None:
            try:
                self.executor.interrupt(None)
            except Exception:
                log.exception("interrupt on shutdown failed")
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._free and (self.paused or not self.store.has_pending()):
                    # the timeout is a safety net; every producer calls notify()
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    return
                free, self._free = self._free, {}
            if free:
                self._do_free(free)
                continue
            if self.paused:
                continue
            with self._claim_lock:
                item = self.store.claim_next()
                self.running = item
            if item is None:
                continue
            self._changed()
            try:
                self._run(item)
            except BaseException:   # the worker thread must outlive any prompt, or the queue stops for good
                log.exception("worker failed while running prompt %s", item.prompt_id)
            finally:
                with self._claim_lock:
                    self.running = None
                self.completed += 1
                self._changed()

    def _changed(self) -> None:
        try:
            self.on_queue_change()
        except Exception:
            log.exception("queue change callback failed")

    def _do_free(self, flags: dict[str, bool]) -> None:
        try:
            self.executor.free(unload_models=flags.get("unload_models", False),
                               free_memory=flags.get("free_memory", False))
        except Exception:
            log.exception("free failed")

    def _run(self, item: QueueItem) -> None:
        client_id = item.extra_data.get("client_id")
        if not isinstance(client_id, str):
            client_id = None
        hub = self.hub
        size = self.preview_size
        states = ProgressStates(item.prompt_id)

        def send_progress_state() -> None:   # on the event loop: the latest state, once per schedule
            hub.dispatch("progress_state", states.frame(), client_id)

        def emit(event: Event) -> None:
            try:
                if states.update(event) and states.take_schedule():
                    hub.post_threadsafe(send_progress_state)
                if event.type == "preview":
                    if event.image is not None and hub.has_listener(client_id):
                        preview = encode_preview(event.image, event.data, size)
                        hub.post_threadsafe(hub.dispatch, "preview", event.data, client_id, preview)
                    return
                if event.type == "executing" and event.data.get("node") is None:
                    return  # sent below, after the history entry is committed
                hub.post_threadsafe(hub.dispatch, event.type, event.data, client_id)
            except Exception:  # an event that cannot be sent must not fail the prompt
                log.exception("could not forward event %s", event.type)

        emit.wants_preview = lambda: hub.has_listener(client_id)  # type: ignore[attr-defined]  # read by the executor
        try:
            result = self.executor.execute(item.prompt, item.prompt_id, outputs=list(item.outputs),
                                           extra_data=dict(item.extra_data), emit=emit)
            ok = result.status == "success"
            entry = history_entry(item, status_str="success" if ok else "error", completed=ok,
                                  messages=list(result.messages), outputs=dict(result.outputs),
                                  meta=dict(result.meta))
        except BaseException as exc:  # the executor itself failed: record it, tell the client, keep working
            log.exception("executor failed on prompt %s", item.prompt_id)
            entry = failed_entry(item, f"{type(exc).__name__}: {exc}", exception_type=type(exc).__name__)
            err = entry["status"]["messages"][-1][1]
            err["traceback"] = traceback.format_tb(exc.__traceback__)
            hub.post_threadsafe(hub.dispatch, "execution_error", err, client_id)
        for attempt in range(5):
            try:
                self.store.finish(item.prompt_id, entry)
                break
            except Exception:  # e.g. a locked database; retry rather than lose the result
                log.exception("could not record history for %s (attempt %d)", item.prompt_id, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        hub.post_threadsafe(hub.dispatch, "executing", {"node": None, "prompt_id": item.prompt_id}, client_id)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
