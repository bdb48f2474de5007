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

from .security import scrub_paths
from .ws import Hub, encode_preview

log = logging.getLogger("sdflow.server")


def scrub_error(data: dict) -> None:
    """An execution error as clients see it: no absolute server paths (the model folders a loader
    searched, the data directory) in its message or traceback."""
    if isinstance(data.get("exception_message"), str):
        data["exception_message"] = scrub_paths(data["exception_message"])
    if isinstance(data.get("traceback"), list):
        data["traceback"] = [scrub_paths(line) if isinstance(line, str) else line for line in data["traceback"]]


class ProgressStates:
    """Builds ComfyUI's `progress_state` frames from the executor's event stream, in ComfyUI's order
    (recorded in shared/data/comfyui-ws-sequences.json): a node's "running" state goes out before its
    `executing`, each step's state before its `progress`, and a node is "finished" when the next one
    starts, when its `executed` arrives (output nodes), or at `execution_success`. A cached output
    node re-sending its result is listed as finished 1/1. Every frame holds all nodes seen so far."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict] = {}
        self.current: str | None = None

    def before(self, event: Event) -> list[dict]:
        """The frames to send ahead of `event`."""
        kind, data = event.type, event.data
        if kind == "executing":
            node = data.get("node")
            frames = self._finish_current()
            if node is not None:
                self.current = node
                self._set(node, "running", 0.0, 1.0)
                frames.append(self.frame())
            return frames
        if kind == "progress" and data.get("node"):
            self._set(data["node"], "running", data.get("value", 0), data.get("max", 1))
            return [self.frame()]
        if kind == "execution_success":
            return self._finish_current()
        if kind in ("execution_error", "execution_interrupted"):
            node = data.get("node_id")
            if kind == "execution_error" and node in self.nodes:
                self.nodes[node]["state"] = "error"
                self.current = None
                return [self.frame()]
            self.current = None
        return []

    def after(self, event: Event) -> list[dict]:
        """The frames to send right after `event`."""
        if event.type != "executed":
            return []
        node = event.data.get("node")
        if node == self.current:
            return self._finish_current()
        if node is not None and node not in self.nodes:   # a cached output node showing its result again
            self._set(node, "finished", 1, 1)
            return [self.frame()]
        return []

    def frame(self) -> dict:
        return {"prompt_id": self.prompt_id, "nodes": {k: dict(v) for k, v in self.nodes.items()}}

    def _finish_current(self) -> list[dict]:
        node, self.current = self.current, None
        if node is None or node not in self.nodes:
            return []
        entry = self.nodes[node]
        entry.update(state="finished", value=entry["max"])
        return [self.frame()]

    def _set(self, node: str, state: str, value: float, maximum: float) -> None:
        self.nodes[node] = {"value": value, "max": maximum, "state": state, "node_id": node,
                            "prompt_id": self.prompt_id, "display_node_id": node, "parent_node_id": None,
                            "real_node_id": node}


class QueueDriver:
    """The control surface the routes use, shared by the embedded Worker and the Ray backend: one thread
    runs `_loop`, woken through `_cond`; pausing is stored, so it survives a restart."""

    thread_name = "sdflow-worker"
    store: Store
    paused: bool
    _cond: threading.Condition
    _thread: threading.Thread | None

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def set_paused(self, paused: bool) -> None:
        self.store.set_paused(paused)
        self.paused = paused
        self.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Worker(QueueDriver):
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
        self._status_sent = False

    # ---- control (any thread) -------------------------------------------------------------------

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
            self._status_sent = False
            try:
                self._run(item)
            except BaseException:   # the worker thread must outlive any prompt, or the queue stops for good
                log.exception("worker failed while running prompt %s", item.prompt_id)
            finally:
                with self._claim_lock:
                    self.running = None
                self.completed += 1
                if not self._status_sent:
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

        def post_states(frames: list[dict]) -> None:
            for frame in frames:
                hub.post_threadsafe(hub.dispatch, "progress_state", frame, client_id)

        def emit(event: Event) -> None:
            try:
                if event.type == "execution_error":
                    scrub_error(event.data)   # in place: the history entry records the same dict
                if event.type == "preview":
                    if event.image is not None and hub.has_preview_listener(client_id):
                        preview = encode_preview(event.image, event.data, size)
                        hub.post_threadsafe(hub.dispatch, "preview", event.data, client_id, preview)
                    return
                if event.type == "image_frame":   # SaveImageWebsocket: an unencoded preview frame (type 2)
                    hub.post_threadsafe(hub.send_binary, event.data["frame"], client_id)
                    return
                post_states(states.before(event))
                if event.type == "executing" and event.data.get("node") is None:
                    return  # sent below, after the history entry is committed
                hub.post_threadsafe(hub.dispatch, event.type, event.data, client_id)
                post_states(states.after(event))
            except Exception:  # an event that cannot be sent must not fail the prompt
                log.exception("could not forward event %s", event.type)

        emit.wants_preview = lambda: hub.has_preview_listener(client_id)  # type: ignore[attr-defined]  # read by the executor
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
            scrub_error(err)
            hub.post_threadsafe(hub.dispatch, "execution_error", err, client_id)
        for attempt in range(5):
            try:
                self.store.finish(item.prompt_id, entry)
                break
            except Exception:  # e.g. a locked database; retry rather than lose the result
                log.exception("could not record history for %s (attempt %d)", item.prompt_id, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        # ComfyUI's end order: execution_success, status (queue without this prompt), executing {node: null}
        self.running = None
        self._changed()
        self._status_sent = True
        hub.post_threadsafe(hub.dispatch, "executing", {"node": None, "prompt_id": item.prompt_id}, client_id)
