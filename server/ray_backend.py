"""The Ray execution backend: whole workflow runs go to worker actors, each with its own executor and
model cache; the queue and history stay in the head's store.

It plugs in where the embedded `server.worker.Worker` does (same methods: start, notify, set_paused,
request_free, interrupt, stop, paused, completed, alive), so routes, hub and store do not know which one
runs. One dispatcher thread claims prompts in queue order while an idle worker exists, and one thread per
running prompt consumes the worker's event stream (a Ray streaming generator) and forwards it to the hub
exactly as the embedded worker does.

Routing: the idle worker whose cache already holds the most of the prompt's model-loading entries (cache
keys computed on the head with the same planning code; the workers report which of their keys hold
models) gets it, else the least loaded idle worker (fewest cached models, then fewest runs). The choice
and its reason go into the history entry under "dispatch".

Faults: a worker process that dies mid-run (SIGKILL, OOM) makes its prompt run once more on another
worker; if that fails too the prompt gets a clear `execution_error`. Ray restarts the dead actor (a new
process, so an empty cache) and it rejoins the pool when it answers again. Claimed prompts are finished
in the store in every path, so nothing queued is lost.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import RuntimeConfig, reset_current_config, set_current_config
from engine.events import Event
from engine.paths import UnsafePathError, contained_path
from engine.planning import compute_keys
from engine.registry import Registry
from engine.store import QueueItem, Store, failed_entry, history_entry
from engine.validation import validate_prompt

from .ray_worker import FILE_KINDS, ExecutorWorker, ui_files
from .worker import ProgressStates, QueueDriver
from .ws import Hub

log = logging.getLogger("sdflow.ray")

NAMESPACE = "sdflow"
SLOT_RESOURCE = "sdflow_worker"        # advertised by `sdflow worker` nodes: how many workers they host
MAX_RESTARTS = 10                      # Ray restarts a dead worker process this often (empty cache each time)
RESCAN_S = 10.0                        # how often the head looks for nodes that joined the cluster
MAX_INPUT_FILE = 256 * 1024 * 1024     # bytes; larger "file names" in a prompt are not shipped
_ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")
_COUNTER = re.compile(r"^(.*_)(\d{5,})(_\.[^.]+)$")


class RayBackendError(RuntimeError):
    """The Ray backend cannot run at all (no worker came up, Ray missing); the message says why."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayBackendError("the Ray backend needs Ray: pip install 'sdflow[ray]'") from None
    return ray


# ---- what a worker needs to build its executor ---------------------------------------------------

@dataclass
class WorkerSpec:
    models_dir: str
    extra_model_paths: list[str] = field(default_factory=list)
    cache_budget_bytes: dict[str, int] | None = None
    preview_method: str = "latent2rgb"
    builtin_nodes: bool = True
    node_modules: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    custom_nodes: list[str] = field(default_factory=list)   # the custom-node folders the head loaded packs from

    @classmethod
    def from_config(cls, config: RuntimeConfig, *, builtin_nodes: bool = True,
                    node_modules: list[str] | None = None, env: dict[str, str] | None = None,
                    custom_nodes: list[str] | None = None) -> WorkerSpec:
        return cls(models_dir=str(Path(str(config.models_dir)).resolve()),
                   extra_model_paths=[str(Path(p).resolve()) for p in config.extra_model_paths],
                   cache_budget_bytes=config.cache_budget_bytes, preview_method=config.preview_method,
                   builtin_nodes=builtin_nodes, node_modules=list(node_modules or []),
                   # the worker's config is built from this spec: the seed switch travels as its env variable
                   env={**({"SDFLOW_LEGACY_CPU_NOISE_SEED": "1"} if config.legacy_cpu_noise_seed else {}),
                        **(env or {})},
                   custom_nodes=list(custom_nodes or []))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- starting or joining the cluster ---------------------------------------------------------------

def prepare_token_auth(data_dir: Path) -> Path | None:
    """Ray 2.59+ turns token authentication on for a local cluster that `ray.init()` starts, and would
    write a token to ~/.ray/auth_token. Unless the user chose (RAY_AUTH_MODE, RAY_AUTH_TOKEN[_PATH] or
    an existing ~/.ray/auth_token), keep the token in sdflow's data dir instead; workers joining with
    `sdflow worker` need it (RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN). Returns the token file made or used."""
    if os.environ.get("RAY_AUTH_MODE") is not None or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    if (Path.home() / ".ray" / "auth_token").is_file():
        return None
    path = Path(data_dir).resolve() / "ray" / "auth_token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    return path


def start_local_ray(*, num_cpus: int | None = None, temp_dir: str | None = None,
                    object_store_memory: int | None = None, data_dir: Path | None = None,
                    resources: dict | None = None) -> None:
    """A local Ray cluster on this machine (what `sdflow serve --backend ray` starts without an address)."""
    ray = _ray()
    if data_dir is not None:
        prepare_token_auth(data_dir)
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if temp_dir is not None:
        kwargs["_temp_dir"] = temp_dir
    if object_store_memory is not None:
        kwargs["object_store_memory"] = object_store_memory
    if resources:
        kwargs["resources"] = resources
    ray.init(**kwargs)


@dataclass
class Slot:
    """One worker actor as the head sees it."""
    name: str
    actor: Any
    info: dict = field(default_factory=dict)
    state: str = "starting"         # starting | idle | busy | restarting | dead
    model_keys: set = field(default_factory=set)
    runs: int = 0
    reason: str = ""
    renames: dict = field(default_factory=dict)   # (kind, subfolder, name) on the worker -> name on the head
    pending_free: dict = field(default_factory=dict)
    events: int = 0                 # events streamed back by this worker (all prompts)

    def describe(self) -> dict:
        return {"worker": self.name, "host": self.info.get("host"), "pid": self.info.get("pid"),
                "node_id": self.info.get("node_id")}


class RayCluster:
    """The worker actors: created at start (one per accelerator of this node, or `workers` CPU workers),
    plus those of nodes that join later with `sdflow worker`. A worker that does not come up within
    `start_timeout` is reported with its reason (`problems`) and left out."""

    def __init__(self, spec: WorkerSpec, *, address: str | None = None, workers: int | None = None,
                 start_timeout: float = 120.0, owns_ray: bool | None = None, **local: Any) -> None:
        ray = _ray()
        self.spec = spec
        self.start_timeout = start_timeout
        self.slots: list[Slot] = []
        self.problems: list[str] = []
        self._nodes_seen: set[str] = set()
        self._starting: list[tuple[Slot, Any]] = []
        self._last_scan = 0.0
        self._spawned = 0
        if ray.is_initialized():
            self.owns_ray = bool(owns_ray)
        else:
            if address:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
            else:
                start_local_ray(**local)
            self.owns_ray = True if owns_ray is None else owns_ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        self._affinity = NodeAffinitySchedulingStrategy
        self._cls = ray.remote(ExecutorWorker)
        self.head_node = ray.get_runtime_context().get_node_id()
        self.address = ray.get_runtime_context().gcs_address
        head: dict = next((n for n in ray.nodes() if n.get("NodeID") == self.head_node), {})
        gpus = int(head.get("Resources", {}).get("GPU", 0))
        if workers is None:
            workers = gpus or 1
            use_gpu = bool(gpus)
        else:
            use_gpu = False          # --workers N: N CPU workers
        self._nodes_seen.add(self.head_node)
        started = [self._spawn(self.head_node, use_gpu) for _ in range(max(1, workers))]
        self._await(started, self.start_timeout)
        if not any(s.state == "idle" for s in self.slots):
            reasons = "; ".join(self.problems) or "unknown reason"
            self.close()
            raise RayBackendError(f"no Ray worker came up: {reasons}")

    def _spawn(self, node_id: str, use_gpu: bool, slot_resource: bool = False) -> tuple[Slot, Any]:
        name = f"worker-{self._spawned}"
        self._spawned += 1
        opts: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": 0, "max_concurrency": 4,
                                "scheduling_strategy": self._affinity(node_id, soft=False)}
        if use_gpu:
            opts.update(num_gpus=1, num_cpus=0)
        elif slot_resource:
            opts.update(num_cpus=0)
        else:
            opts.update(num_cpus=1)
        if slot_resource:
            opts["resources"] = {SLOT_RESOURCE: 1}
        actor = self._cls.options(**opts).remote(self.spec.as_dict(), name)
        requires = {k: v for k, v in opts.items() if k in ("num_gpus", "num_cpus", "resources")}
        slot = Slot(name, actor, {"requires": requires})
        return slot, actor.ready.remote()

    def _await(self, started: list[tuple[Slot, Any]], timeout: float) -> None:
        """Wait for workers to answer; those that fail or never get placed are reported and dropped."""
        ray = _ray()
        refs = {ref: slot for slot, ref in started}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
        for ref in done:
            self._settle(refs[ref], ref)
        for ref in pending:
            slot = refs[ref]
            free = ray.available_resources()
            have = ", ".join(f"{free.get(k, 0):g} {k}" for k in ("CPU", "GPU", SLOT_RESOURCE))
            self._report(slot, f"not placed within {timeout:.0f}s: it needs {_needs(slot.info.get('requires'))}; "
                               f"free in the cluster: {have} (a GPU worker needs a GPU, a CPU worker a free CPU)")
            ray.kill(slot.actor, no_restart=True)

    def _settle(self, slot: Slot, ref: Any) -> None:
        ray = _ray()
        try:
            info = ray.get(ref)
        except Exception as exc:   # its constructor failed: a bad node module, a missing package, ...
            self._report(slot, _reason(exc))
            return
        slot.info.update(info)
        slot.state = "idle"
        self.slots.append(slot)
        log.info("Ray worker %s up: pid %s on %s", slot.name, info.get("pid"), info.get("host"))

    def _report(self, slot: Slot, reason: str) -> None:
        message = f"{slot.name}: {reason}"
        self.problems.append(message)
        log.error("Ray worker did not come up: %s", message)

    def rescan(self) -> list[Slot]:
        """Start workers on nodes that joined with `sdflow worker`, and adopt those that came up."""
        ray = _ray()
        now = time.monotonic()
        if now - self._last_scan >= RESCAN_S:
            self._last_scan = now
            try:
                nodes = ray.nodes()
            except Exception:
                nodes = []
            for node in nodes:
                nid, res = node.get("NodeID"), node.get("Resources", {})
                if node.get("Alive") and res.get(SLOT_RESOURCE) and nid not in self._nodes_seen:
                    self._nodes_seen.add(nid)
                    for _ in range(int(res[SLOT_RESOURCE])):
                        self._starting.append(self._spawn(nid, bool(res.get("GPU")), slot_resource=True))
        adopted = []
        if self._starting:
            refs = [ref for _, ref in self._starting]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            keep = []
            for slot, ref in self._starting:
                if ref in done:
                    self._settle(slot, ref)
                    if slot.state == "idle":
                        adopted.append(slot)
                else:
                    keep.append((slot, ref))
            self._starting = keep
        return adopted

    def close(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        for slot in self.slots + [s for s, _ in self._starting]:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        if self.owns_ray:
            ray.shutdown()


def _needs(requires: dict | None) -> str:
    requires = dict(requires or {})
    parts = [f"{requires.pop('num_cpus', 0):g} CPU", f"{requires.pop('num_gpus', 0):g} GPU"]
    parts += [f"{v:g} {k}" for k, v in (requires.pop("resources", None) or {}).items()]
    return ", ".join(parts)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or getattr(exc, "creation_task_exception", None)
    if cause is not None and not isinstance(cause, str):
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:500]
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's message ends with the constructor's exception line; keep that, it names the problem
    return (lines[-1] if lines else type(exc).__name__)[:500]


# ---- the dispatcher ----------------------------------------------------------------------------------

class RayBackend(QueueDriver):
    """Worker-compatible: `create_app(..., worker_factory=RayBackend.factory(cluster, config, registry))`."""

    thread_name = "sdflow-ray-dispatch"

    def __init__(self, store: Store, executor: Any, hub: Hub, *, preview_size: int = 512,
                 on_queue_change: Callable[[], None] | None = None, cluster: RayCluster,
                 config: RuntimeConfig, registry: Registry, rerun_timeout: float = 120.0) -> None:
        self.store, self.hub, self.cluster = store, hub, cluster
        self.config, self.registry = config, registry
        self.preview_size = preview_size
        self.on_queue_change = on_queue_change or (lambda: None)
        self.rerun_timeout = rerun_timeout
        self.paused = store.paused
        self.completed = 0
        self._cond = threading.Condition()
        self._stop = False
        self._reruns = 0                         # run threads waiting for a worker to re-run on
        self._running: dict[str, tuple[QueueItem, Slot]] = {}
        self._serving: set[str] = set()          # claimed from the store and not yet finished
        self._interrupted: set[str] = set()      # interrupted while on no worker (claimed, or awaiting a re-run)
        self._threads: set[threading.Thread] = set()
        self._files_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        hub.on_connect.append(self._watcher_connected)

    @classmethod
    def factory(cls, cluster: RayCluster, config: RuntimeConfig, registry: Registry, **kw: Any):
        def make(store: Store, executor: Any, hub: Hub, **opts: Any) -> RayBackend:
            return cls(store, executor, hub, cluster=cluster, config=config, registry=registry, **opts, **kw)
        return make

    # ---- the Worker interface ------------------------------------------------------------------------
    @property
    def slots(self) -> list[Slot]:
        return self.cluster.slots

    @property
    def running(self) -> QueueItem | None:
        return next((item for item, _ in list(self._running.values())), None)


    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        with self._cond:
            for slot in self.slots:
                if slot.state == "idle":
                    self._free(slot, {"unload_models": unload_models, "free_memory": free_memory})
                elif slot.state == "busy":
                    slot.pending_free = {k: slot.pending_free.get(k, False) or v for k, v in
                                         (("unload_models", unload_models), ("free_memory", free_memory))}

    def _free(self, slot: Slot, flags: dict) -> None:
        if flags.get("unload_models") or flags.get("free_memory"):
            slot.actor.free.remote(bool(flags.get("unload_models")), bool(flags.get("free_memory")))
            slot.model_keys = set()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Global interrupt (every running prompt), or the worker that runs `prompt_id`."""
        with self._cond:
            running = list(self._running.values())
            waiting = {p for p in self._serving if p not in self._running and prompt_id in (None, p)}
            self._interrupted |= waiting
        hit = bool(waiting)
        for item, slot in running:
            if prompt_id is None or item.prompt_id == prompt_id:
                try:
                    slot.actor.interrupt.remote(item.prompt_id)
                    hit = True
                except Exception:
                    log.exception("could not reach %s to interrupt", slot.name)
        return hit

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.interrupt(None)
        deadline = time.monotonic() + timeout
        for thread in [self._thread, *list(self._threads)]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self.cluster.close()

    def status(self) -> list[dict]:
        """The workers, for logs and tests."""
        return [{**s.describe(), "state": s.state, "models": len(s.model_keys), "runs": s.runs, "reason": s.reason}
                for s in self.slots]

    # ---- dispatching --------------------------------------------------------------------------------
    def _idle(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Slot]:
        return [s for s in self.slots if s.state == "idle" and s.name not in exclude]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self.paused or self._reruns or not self._idle()
                                          or not self.store.has_pending()):
                    self._cond.wait(timeout=1.0)   # a safety net and the rescan tick; producers notify
                    self._adopt()
                if self._stop:
                    return
            try:
                item = self.store.claim_next()
            except Exception:
                log.exception("could not claim the next prompt")
                continue
            if item is None:
                continue
            with self._cond:
                self._serving.add(item.prompt_id)
            keys = self._model_keys_of(item)
            with self._cond:
                slot, reason, hits = self._choose(keys, set())
                if slot is None:     # the idle worker went away meanwhile: wait like a re-run would
                    slot, reason, hits = self._wait_for_worker(keys, set(), self.rerun_timeout)
                if slot is not None:
                    self._claim(slot, item)
            self._changed()
            thread = threading.Thread(target=self._serve, args=(item, slot, keys, reason, hits),
                                      name=f"sdflow-ray-{item.prompt_id[:8]}", daemon=True)
            self._threads.add(thread)
            thread.start()

    def _adopt(self) -> None:
        try:
            if self.cluster.rescan():
                self._cond.notify_all()
        except Exception:
            log.exception("rescanning the Ray cluster failed")

    def _model_keys_of(self, item: QueueItem) -> set[str]:
        """The cache keys of the prompt's nodes, computed as the executor does (model-holding ones are
        what workers report, so the intersection counts model-loading nodes only)."""
        token = set_current_config(self.config)
        try:
            vr = validate_prompt(item.prompt, self.registry, list(item.outputs) or None)
            if not vr.ok:
                return set()
            return set(compute_keys(vr.nodes, vr.order, uuid.uuid4().hex).values())
        except Exception:
            log.exception("could not compute cache keys of %s", item.prompt_id)
            return set()
        finally:
            reset_current_config(token)

    def _choose(self, keys: set[str], exclude: set[str]) -> tuple[Slot | None, str, int]:
        idle = self._idle(exclude)
        if not idle:
            return None, "", 0
        best = max(idle, key=lambda s: len(keys & s.model_keys))
        hits = len(keys & best.model_keys)
        if hits:
            return best, f"affinity: holds {hits} of the prompt's loaded models", hits
        least = min(idle, key=lambda s: (len(s.model_keys), s.runs))
        return least, "least loaded: no worker holds the prompt's models", 0

    def _wait_for_worker(self, keys: set[str], exclude: set[str], timeout: float) -> tuple[Slot | None, str, int]:
        """Under the lock: wait until a worker not in `exclude` is idle."""
        deadline = time.monotonic() + timeout
        while not self._stop:
            slot, reason, hits = self._choose(keys, exclude)
            if slot is not None:
                return slot, reason, hits
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(timeout=min(remaining, 1.0))
            self._adopt()
        return None, "", 0

    def _claim(self, slot: Slot, item: QueueItem) -> None:
        slot.state = "busy"
        slot.runs += 1
        self._running[item.prompt_id] = (item, slot)
        if item.prompt_id in self._interrupted:   # the executor keeps it until the prompt starts there
            slot.actor.interrupt.remote(item.prompt_id)

    def _release(self, slot: Slot, item: QueueItem) -> None:
        with self._cond:
            if self._running.get(item.prompt_id, (None, None))[1] is slot:
                del self._running[item.prompt_id]
            if slot.state == "busy":
                slot.state = "idle"
                if slot.pending_free:
                    self._free(slot, slot.pending_free)
                    slot.pending_free = {}
            self._cond.notify_all()

    def _changed(self) -> None:
        try:
            self.on_queue_change()
        except Exception:
            log.exception("queue change callback failed")

    # ---- one prompt -----------------------------------------------------------------------------------
    def _serve(self, item: QueueItem, slot: Slot | None, keys: set[str], reason: str, hits: int) -> None:
        client_id = item.extra_data.get("client_id")
        client_id = client_id if isinstance(client_id, str) else None
        attempts: list[dict] = []
        entry: dict | None = None
        try:
            for attempt in range(2):
                if slot is None:
                    entry = failed_entry(item, "no Ray worker is available to run this prompt"
                                         + (f" ({'; '.join(a['failure'] for a in attempts)})" if attempts else ""),
                                         exception_type="NoWorker")
                    break
                attempts.append({**slot.describe(), "reason": reason, "affinity_hits": hits})
                try:
                    entry = self._run_on(slot, item, client_id)
                except _WorkerLost as lost:
                    attempts[-1]["failure"] = lost.reason
                    self._lost(slot, lost.reason)
                    self._release(slot, item)
                    if attempt == 1:
                        entry = failed_entry(
                            item, f"worker {attempts[0]['worker']} died while running this prompt "
                                  f"({attempts[0]['failure']}), and so did the re-run on {slot.name} ({lost.reason})",
                            exception_type="WorkerDied")
                        break
                    if item.prompt_id in self._interrupted:   # the user stopped it: no re-run
                        entry = _interrupted_entry(item, lost.reason)
                        break
                    log.warning("%s died running %s (%s); re-running it on another worker",
                                slot.name, item.prompt_id, lost.reason)
                    exclude = {slot.name} if len(self.slots) > 1 else set()
                    with self._cond:
                        self._reruns += 1
                        try:
                            slot, reason, hits = self._wait_for_worker(keys, exclude, self.rerun_timeout)
                            if slot is not None:
                                self._claim(slot, item)
                        finally:
                            self._reruns -= 1
                            self._cond.notify_all()
                    reason = f"re-run after a worker failure; {reason}"
                    continue
                except BaseException:
                    self._release(slot, item)
                    raise
                self._release(slot, item)
                break
        except BaseException as exc:   # a bug here must not lose the prompt or stop the queue
            log.exception("Ray dispatch failed on prompt %s", item.prompt_id)
            entry = failed_entry(item, f"{type(exc).__name__}: {exc}", exception_type=type(exc).__name__)
        assert entry is not None
        entry["dispatch"] = {**(attempts[-1] if attempts else {}), "attempts": attempts}
        messages = entry["status"]["messages"]
        if entry["status"]["status_str"] == "error" and messages and messages[-1][0] == "execution_error" \
                and not entry.get("_sent"):
            self.hub.post_threadsafe(self.hub.dispatch, "execution_error", messages[-1][1], client_id)
        entry.pop("_sent", None)
        interrupted = entry.pop("_interrupted", None)
        if interrupted is not None:
            self.hub.post_threadsafe(self.hub.dispatch, "execution_interrupted", interrupted, client_id)
        self._finish(item, entry, client_id)

    def _finish(self, item: QueueItem, entry: dict, client_id: str | None) -> None:
        for attempt in range(5):
            try:
                self.store.finish(item.prompt_id, entry)
                break
            except Exception:
                log.exception("could not record history for %s (attempt %d)", item.prompt_id, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        self.completed += 1
        with self._cond:
            self._serving.discard(item.prompt_id)
            self._interrupted.discard(item.prompt_id)
        # ComfyUI's end order: status (the queue without this prompt), then executing {node: null}
        self._changed()
        self.hub.post_threadsafe(self.hub.dispatch, "executing", {"node": None, "prompt_id": item.prompt_id},
                                 client_id)
        with self._cond:
            self._threads.discard(threading.current_thread())
            self._cond.notify_all()

    def _job(self, item: QueueItem, client_id: str | None) -> dict:
        return {"prompt_id": item.prompt_id, "prompt": item.prompt, "outputs": list(item.outputs),
                "extra_data": dict(item.extra_data), "files": self._input_files(item.prompt),
                "watched": self.hub.has_listener(client_id),
                "wants_preview": self.hub.has_preview_listener(client_id),
                "preview_size": self.preview_size}

    def _watcher_connected(self, sid: str) -> None:
        """A websocket client connected: the workers running its prompts (or prompts of no client, which
        go to everyone) stream all their events from now on. Cheap when they already do."""
        with self._cond:
            running = [(pid, item, slot) for pid, (item, slot) in self._running.items()]
        for pid, item, slot in running:
            owner = item.extra_data.get("client_id")
            owner = owner if isinstance(owner, str) else None
            if owner is None or owner == sid:
                try:
                    slot.actor.listen.remote(pid, self.hub.has_preview_listener(owner))
                except Exception:   # the actor is gone: its prompt is being re-run, and re-sent watched
                    log.debug("could not reach %s for %s", slot.name, pid, exc_info=True)

    def _run_on(self, slot: Slot, item: QueueItem, client_id: str | None) -> dict:
        """Run on `slot`, forwarding events; returns the history entry. Raises _WorkerLost if the worker
        process goes away."""
        ray = _ray()
        from ray.exceptions import RayTaskError
        states = ProgressStates(item.prompt_id)

        result: dict | None = None
        try:
            stream = slot.actor.run.options(num_returns="streaming").remote(self._job(item, client_id))
            for ref in stream:
                msg = ray.get(ref)
                if msg[0] == "events":
                    for event in msg[1]:
                        self._forward(slot, states, client_id, *event[1:])
                elif msg[0] == "result":
                    result = msg[1]
                elif msg[0] == "crash":
                    _, message, tb, kind = msg
                    entry = failed_entry(item, message, exception_type=kind)
                    entry["status"]["messages"][-1][1]["traceback"] = tb
                    return entry
        except RayTaskError as exc:   # a bug in the worker's own code, not a lost process
            return failed_entry(item, f"worker {slot.name} failed: {_reason(exc)}", exception_type="WorkerError")
        except ray.exceptions.RayError as exc:   # the actor died, its node went away, the object was lost
            raise _WorkerLost(_reason(exc)) from exc
        if result is None:
            raise _WorkerLost("the event stream ended without a result")
        self._place_files(slot, result.get("files") or [])
        slot.model_keys = set(result.get("model_keys") or [])
        ok = result["status"] == "success"
        outputs = {nid: self._renamed(slot, ui) for nid, ui in result["outputs"].items()}
        return history_entry(item, status_str="success" if ok else "error", completed=ok,
                             messages=result["messages"], outputs=outputs, meta=result["meta"]) | {"_sent": True}

    def _forward(self, slot: Slot, states: ProgressStates,
                 client_id: str | None, kind: str, data: dict, preview: Any, files: list | None) -> None:
        """What the embedded worker's emit does, for an event that came over the wire."""
        hub = self.hub
        slot.events += 1
        try:
            if kind == "executed":
                self._place_files(slot, files or [])
                data = {**data, "output": self._renamed(slot, data.get("output"))}
            event = Event(kind, data)
            if kind == "preview":
                if preview is not None and hub.has_preview_listener(client_id):
                    hub.post_threadsafe(hub.dispatch, "preview", data, client_id, preview)
                return
            if kind == "image_frame":   # SaveImageWebsocket: an unencoded preview frame (type 2)
                hub.post_threadsafe(hub.send_binary, data["frame"], client_id)
                return
            for frame in states.before(event):
                hub.post_threadsafe(hub.dispatch, "progress_state", frame, client_id)
            if kind == "executing" and data.get("node") is None:
                return   # sent after the history entry is committed
            hub.post_threadsafe(hub.dispatch, kind, data, client_id)
            for frame in states.after(event):
                hub.post_threadsafe(hub.dispatch, "progress_state", frame, client_id)
        except Exception:
            log.exception("could not forward event %s", kind)

    # ---- files through the head's folders ------------------------------------------------------------
    def _dir(self, kind: str) -> Path:
        return Path(getattr(self.config, f"{kind}_dir"))

    def _input_files(self, prompt: dict) -> dict[str, dict[str, bytes]]:
        """Every constant input that names a file in the head's input (or annotated output/temp) folder."""
        files: dict[str, dict[str, bytes]] = {}
        for node in prompt.values() if isinstance(prompt, dict) else ():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            for value in (inputs or {}).values():
                if not isinstance(value, str) or not value or len(value) > 1024 or "\n" in value:
                    continue
                name, kind = value, "input"
                match = _ANNOTATION.match(value)
                if match:
                    name, kind = match.group(1), match.group(2)
                try:
                    path = contained_path(self._dir(kind), name)
                    if path.is_file() and path.stat().st_size <= MAX_INPUT_FILE:
                        files.setdefault(kind, {})[name] = path.read_bytes()
                except (UnsafePathError, OSError, ValueError):
                    continue
        return files

    def _place_files(self, slot: Slot, files: list) -> None:
        """Write files a worker made into the head's folders, under a free name (workers number their
        files independently, so two can make the same name)."""
        with self._files_lock:
            for kind, sub, name, data in files:
                if kind not in FILE_KINDS:
                    continue
                try:
                    folder = contained_path(self._dir(kind), sub) if sub else self._dir(kind)
                    folder.mkdir(parents=True, exist_ok=True)
                    final = _free_name(folder, name)
                    target = contained_path(folder, final)
                    tmp = target.with_name(f".{final}.{uuid.uuid4().hex}.part")
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                except (UnsafePathError, OSError) as exc:
                    log.error("could not store %s/%s from %s: %s", sub, name, slot.name, exc)
                    continue
                if final != name:
                    slot.renames[(kind, sub, name)] = final
                else:
                    slot.renames.pop((kind, sub, name), None)

    def _renamed(self, slot: Slot, ui: Any) -> Any:
        if not isinstance(ui, dict) or not slot.renames:
            return ui
        out = {}
        for key, value in ui.items():
            if isinstance(value, list):
                value = [({**v, "filename": slot.renames.get((v.get("type", "output"), v.get("subfolder") or "",
                                                               v["filename"]), v["filename"])}
                          if v in ui_files({key: [v]}) else v) for v in value]
            out[key] = value
        return out

    def _lost(self, slot: Slot, reason: str) -> None:
        """A worker process died: it comes back (Ray restarts it) with an empty cache."""
        with self._cond:
            slot.state = "restarting"
            slot.reason = reason
            slot.model_keys = set()
            slot.renames = {}
        threading.Thread(target=self._await_restart, args=(slot,), name=f"sdflow-ray-restart-{slot.name}",
                         daemon=True).start()

    def _await_restart(self, slot: Slot) -> None:
        ray = _ray()
        deadline = time.monotonic() + self.cluster.start_timeout
        while not self._stop and time.monotonic() < deadline:
            try:
                info = ray.get(slot.actor.ready.remote(), timeout=5.0)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayActorError:
                # still restarting (a call may fail while the new process starts): ask again shortly;
                # a worker that cannot come back is declared dead at the deadline
                time.sleep(0.2)
                continue
            with self._cond:
                slot.info.update(info)
                slot.state = "idle"
                self._cond.notify_all()
            log.info("Ray worker %s restarted (pid %s, empty cache)", slot.name, info.get("pid"))
            return
        with self._cond:
            slot.state = "dead"
            self._cond.notify_all()
        log.error("Ray worker %s did not come back after a failure (%s)", slot.name, slot.reason)


def _interrupted_entry(item: QueueItem, reason: str) -> dict:
    data: dict[str, Any] = {"prompt_id": item.prompt_id, "node_id": None, "node_type": None, "executed": [],
            "timestamp": int(time.time() * 1000), "reason": f"interrupted after its worker died ({reason})"}
    return history_entry(item, status_str="error", completed=False,
                         messages=[["execution_interrupted", data]]) | {"_interrupted": data}


class _WorkerLost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _free_name(folder: Path, name: str) -> str:
    if not (folder / name).exists():
        return name
    match = _COUNTER.match(name)
    if match:   # `<prefix>_00001_.png`: continue the counter, as SaveImage would have on the head
        head, num, tail = match.group(1), int(match.group(2)), match.group(3)
        width = len(match.group(2))
        while (folder / f"{head}{num:0{width}}{tail}").exists():
            num += 1
        return f"{head}{num:0{width}}{tail}"
    stem, dot, ext = name.rpartition(".")
    stem, ext = (stem, "." + ext) if dot else (name, "")
    n = 1
    while (folder / f"{stem}_{n}{ext}").exists():
        n += 1
    return f"{stem}_{n}{ext}"


# ---- `sdflow worker` --------------------------------------------------------------------------------

def worker_node_command(address: str, workers: int | None = None) -> list[str]:
    """`ray start` joining `address` as a node that hosts `workers` sdflow workers (default: one per GPU,
    else one); the head starts the workers on it when it sees the node."""
    if workers is None:
        workers = _local_gpus() or 1
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return [ray_bin, "start", f"--address={address}", "--block",
            f"--resources={json.dumps({SLOT_RESOURCE: int(workers)})}"]


def _local_gpus() -> int:
    try:
        import torch  # only to count GPUs
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:
        return 0


def worker_node_env(environ: dict | None = None) -> dict:
    """`ray start --address` (2.60) does not turn token auth on by itself when it finds a token, unlike
    a head: with a token at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and no
    RAY_AUTH_MODE chosen, ask for token mode so the node can talk to a head that requires it."""
    env = dict(os.environ if environ is None else environ)
    has_token = env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or \
        (Path.home() / ".ray" / "auth_token").is_file()
    if has_token and "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
    return env


def run_worker_node(address: str, workers: int | None = None) -> int:
    cmd = worker_node_command(address, workers)
    print(f"sdflow worker: joining the Ray cluster at {address} ({' '.join(cmd[1:])})", flush=True)
    try:
        return subprocess.call(cmd, env=worker_node_env())
    except FileNotFoundError:
        raise RayBackendError("the `ray` command is missing: pip install 'sdflow[ray]'") from None
    except KeyboardInterrupt:
        return 130
