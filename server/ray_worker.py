"""The body of a Ray worker actor: one executor with its own model cache, in its own process.

It is a plain class (no Ray import here): `server.ray_backend` turns it into an actor. The worker holds no
state beyond its cache. Files travel with the work, so a worker on another machine needs no shared
filesystem: the head sends the input files a prompt names, the worker runs in a scratch directory of its
own and sends every file an output node wrote back with the `executed` event that names it (the head
writes them into its folders before forwarding the event, so a client that fetches `/view` finds them).

`run` is a generator (a Ray streaming generator on the head's side): it yields one message per event, as
the executor emits them, and a last `result` message. A prompt that nobody watches (no websocket client of
its owner when it was sent) streams no per-step `progress` and per-node `executing` events: each streamed
item costs both processes CPU that small prompts on shared cores feel, and the head would drop them
(as the embedded hub drops events for nobody). `listen` turns them back on when a watcher connects.

The executor runs in a thread of the actor; the actor is threaded so that `interrupt` reaches it while
`run` is streaming (a running sync actor method cannot be cancelled by Ray: the executor's cooperative
flag is the way in).
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.config import RuntimeConfig
from engine.events import Event
from engine.paths import UnsafePathError, contained_path

FILE_KINDS = ("input", "output", "temp")
_DONE = object()
# What only a watching client needs: the head turns none of it into state (the history entry, outputs and
# files come with `executed` and the result).
WATCHER_ONLY = frozenset({"progress", "executing"})
# Events that come within this many seconds of the first of a batch travel as one streamed item: a step
# every few ms would otherwise cost a Ray object each; a progress bar redrawn at 40 Hz looks the same.
BATCH_WINDOW = 0.025


def _batched(events: queue.Queue) -> Iterator[tuple]:
    """The queue's messages until _DONE, as ("events", [message, ...]) items."""
    while True:
        first = events.get()
        if first is _DONE:
            return
        batch = [first]
        deadline = time.monotonic() + BATCH_WINDOW
        done = False
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = events.get(timeout=remaining)
            except queue.Empty:
                break
            if msg is _DONE:
                done = True
                break
            batch.append(msg)
        yield ("events", batch)
        if done:
            return


def ui_files(ui: Any) -> list[dict]:
    """The file references (`{filename, subfolder, type}`) in an output node's UI dict."""
    found: list[dict] = []
    if isinstance(ui, dict):
        for value in ui.values():
            if isinstance(value, list):
                found.extend(item for item in value if isinstance(item, dict) and isinstance(item.get("filename"), str)
                             and item.get("type", "output") in ("output", "temp"))
    return found


class ExecutorWorker:
    """`spec`: models_dir, extra_model_paths, cache_budget_bytes, preview_method, builtin_nodes,
    node_modules, env (see `ray_backend.WorkerSpec`)."""

    def __init__(self, spec: dict, name: str) -> None:
        os.environ.update(spec.get("env") or {})
        self.name = name
        self.scratch = Path(tempfile.mkdtemp(prefix="sdflow-worker-"))
        self.config = RuntimeConfig(
            data_dir=self.scratch, models_dir=Path(spec["models_dir"]),
            input_dir=self.scratch / "input", output_dir=self.scratch / "output", temp_dir=self.scratch / "temp",
            user_dir=self.scratch / "user", extra_model_paths=[Path(p) for p in spec.get("extra_model_paths", [])],
            cache_budget_bytes=spec.get("cache_budget_bytes"),
            preview_method=spec.get("preview_method", "latent2rgb"))
        self.config.ensure_dirs()
        from engine.executor import Executor

        from .cli import build_registry
        args = argparse.Namespace(no_builtin_nodes=not spec.get("builtin_nodes", True),
                                  nodes_module=list(spec.get("node_modules", [])),
                                  custom_nodes=list(spec.get("custom_nodes", [])),
                                  disable_all_custom_nodes=not spec.get("custom_nodes"))
        try:
            registry, _ = build_registry(args, self.config)
        except SystemExit as exc:   # the CLI helper exits on a bad module; here it is a start failure
            raise RuntimeError(str(exc)) from None
        self.executor = Executor(registry, config=self.config)
        self._watch_lock = threading.Lock()
        # per running prompt: {"watched": stream watcher-only events, "previews": stream step previews}
        self._watch: dict[str, dict[str, bool]] = {}
        self._watched_early: dict[str, bool] = {}   # `listen` came before its `run` (a threaded actor)

    # ---- control (any thread of the actor) ---------------------------------------------------------
    def ready(self) -> dict:
        import ray
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "nodes": len(self.executor.registry)}

    def interrupt(self, prompt_id: str | None) -> None:
        # keyed by prompt id: one that arrives before its prompt starts is kept by the executor
        self.executor.interrupt(prompt_id)

    def listen(self, prompt_id: str, previews: bool) -> None:
        """A client watching `prompt_id` connected: stream all of its events (and its step previews if
        it wants them) from now on."""
        with self._watch_lock:
            state = self._watch.get(prompt_id)
            if state is not None:
                state["watched"] = True
                state["previews"] = state["previews"] or previews
                return
            if len(self._watched_early) > 1000:   # prompts that were sent elsewhere after all
                self._watched_early.clear()
            self._watched_early[prompt_id] = self._watched_early.get(prompt_id, False) or previews

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.executor.free(unload_models=unload_models, free_memory=free_memory)

    def model_keys(self) -> list[str]:
        return self.executor.cache.model_keys()

    def stats(self) -> dict:
        return self.executor.cache.stats()

    # ---- running one prompt ------------------------------------------------------------------------
    def run(self, job: dict) -> Iterator[tuple]:
        """Yields ("events", [("event", type, data, preview, files), ...]) as events come, then
        ("result", {...}) or ("crash", message, traceback)."""
        from .ws import encode_preview

        pid = job["prompt_id"]
        self._reset_scratch(job.get("files") or {})
        events: queue.Queue = queue.Queue()
        size = int(job.get("preview_size", 512))
        watch = {"watched": bool(job.get("watched", True)), "previews": bool(job.get("wants_preview"))}
        with self._watch_lock:
            if pid in self._watched_early:
                watch = {"watched": True, "previews": watch["previews"] or self._watched_early.pop(pid)}
            self._watch[pid] = watch

        def emit(event: Event) -> None:
            if event.type in WATCHER_ONLY and not watch["watched"]:
                return
            if event.type == "preview":
                if event.image is not None and watch["previews"]:
                    events.put(("event", "preview", event.data, encode_preview(event.image, event.data, size), None))
                return
            files = self._take_files(event.data.get("output")) if event.type == "executed" else None
            events.put(("event", event.type, event.data, None, files))

        emit.wants_preview = lambda: watch["previews"]  # type: ignore[attr-defined]
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["result"] = self.executor.execute(job["prompt"], pid, outputs=list(job.get("outputs") or []),
                                                      extra_data=dict(job.get("extra_data") or {}), emit=emit)
            except BaseException as exc:   # reported to the head as a failed run, never lost
                box["crash"] = (f"{type(exc).__name__}: {exc}", traceback.format_tb(exc.__traceback__),
                                type(exc).__name__)
            finally:
                events.put(_DONE)

        thread = threading.Thread(target=work, name=f"sdflow-run-{pid[:8]}", daemon=True)
        thread.start()
        yield from _batched(events)
        thread.join()
        with self._watch_lock:
            self._watch.pop(pid, None)
        if "crash" in box:
            yield ("crash",) + box["crash"]
            return
        r = box["result"]
        yield ("result", {"status": r.status, "messages": list(r.messages), "outputs": dict(r.outputs),
                          "meta": dict(r.meta), "executed": list(r.executed), "cached": list(r.cached),
                          "model_keys": self.executor.cache.model_keys(), "files": self._take_all()})

    def _reset_scratch(self, files: dict[str, dict[str, bytes]]) -> None:
        for kind in FILE_KINDS:
            folder = getattr(self.config, f"{kind}_dir")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            for rel, data in (files.get(kind) or {}).items():
                try:
                    path = contained_path(folder, rel)
                except UnsafePathError:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

    def _take_files(self, ui: Any) -> list[tuple[str, str, str, bytes]]:
        """The files an `executed` event names, read and removed from the scratch (they now belong to
        the head). A cached output node names files sent with an earlier run: none are found here."""
        taken = []
        for item in ui_files(ui):
            kind = item.get("type", "output")
            sub = item.get("subfolder") or ""
            try:
                path = contained_path(getattr(self.config, f"{kind}_dir"), sub, item["filename"])
            except UnsafePathError:
                continue
            if path.is_file():
                taken.append((kind, sub, item["filename"], path.read_bytes()))
                path.unlink()
        return taken

    def _take_all(self) -> list[tuple[str, str, str, bytes]]:
        """Files left in the output folder that no event named (a node that writes without showing)."""
        taken: list[tuple[str, str, str, bytes]] = []
        base = self.scratch / "output"
        for root, _dirs, names in os.walk(base):
            for name in names:
                path = Path(root) / name
                sub = os.path.relpath(root, base).replace(os.sep, "/")
                taken.append(("output", "" if sub == "." else sub, name, path.read_bytes()))
                path.unlink()
        return taken
