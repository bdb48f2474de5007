"""The executor: runs a validated prompt's plan, caching every node's outputs and emitting events.

One executor drives one device; it is synchronous and meant to be called from one worker thread.
Inputs are mapped over lists as ComfyUI does (every input is a list; a node is called once per item unless
it takes whole lists; shorter lists repeat their last item), lazy inputs are evaluated only when the node's
`check_lazy` asks for them, and interrupts are checked before each node and at each progress report.
"""
from __future__ import annotations

import json
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from .cache import CacheEntry, OutputCache
from .config import reset_current_config, set_current_config
from .events import Emit, Event, no_emit, now_ms
from .node import NodeDef, NodeOutput
from .planning import compute_keys, needed_nodes
from .progress import Interrupted, NodeContext, _current
from .registry import Registry
from .validation import ResolvedNode, validate_prompt


@dataclass
class RunResult:
    status: str                                   # "success" | "error" | "interrupted"
    outputs: dict[str, dict] = field(default_factory=dict)
    messages: list[list] = field(default_factory=list)
    meta: dict[str, dict] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)   # nodes that really ran
    cached: list[str] = field(default_factory=list)
    error: dict | None = None


class NodeFailure(Exception):
    def __init__(self, node_id: str, nodedef: NodeDef, exc: BaseException, inputs: dict[str, list]):
        super().__init__(str(exc))
        self.node_id, self.nodedef, self.exc, self.inputs = node_id, nodedef, exc, inputs


class Executor:
    def __init__(self, registry: Registry, cache: OutputCache | None = None, config: Any = None) -> None:
        self.registry = registry
        config = config if config is not None else getattr(registry, "config", None)
        budgets = getattr(config, "cache_budget_bytes", None) if config is not None else None
        self.cache = cache if cache is not None else OutputCache(budgets)
        self.config = config
        # Nodes skip making step previews when nobody wants them (RuntimeConfig.preview_method "none").
        self.previews = getattr(config, "preview_method", "latent2rgb") != "none"
        self._interrupt = threading.Event()
        self._running: str | None = None
        self._last_validation: tuple[str, Any] | None = None   # (digest of prompt + targets, result)

    # ---- control from other threads --------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> None:
        if prompt_id is None or prompt_id == self._running:
            self._interrupt.set()

    @property
    def running(self) -> str | None:
        return self._running

    def free(self, *, unload_models: bool = False, free_memory: bool = False) -> None:
        if free_memory:
            self.cache.clear()
        elif unload_models:
            self.cache.clear(only_models=True)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- running a prompt -------------------------------------------------------------------------
    def execute(self, prompt: dict, prompt_id: str, *, outputs: list[str] | None = None,
                extra_data: dict | None = None, emit: Emit = no_emit) -> RunResult:
        self._interrupt.clear()
        self._running = prompt_id
        token = set_current_config(self.config)
        try:
            return _Run(self, prompt, prompt_id, outputs, extra_data or {}, emit).go()
        finally:
            reset_current_config(token)
            self._running = None
            self.cache.unpin_all()

    def _validate(self, prompt: dict, targets: list[str] | None):
        """Validation, memoized for an identical re-run (the common 'queue again' case); values are
        re-validated whenever the prompt text or the targets differ."""
        try:
            digest = json.dumps([prompt, targets], sort_keys=False, default=repr)
        except (TypeError, ValueError):
            digest = None
        last = self._last_validation
        if digest is not None and last is not None and last[0] == digest:
            return last[1]
        vr = validate_prompt(prompt, self.registry, targets)
        self._last_validation = (digest, vr) if digest is not None and vr.ok else None
        return vr

    def _check_interrupt(self) -> None:
        if self._interrupt.is_set():
            raise Interrupted("interrupted")


class _Run:
    """The state of one prompt's execution."""

    def __init__(self, ex: Executor, prompt: dict, prompt_id: str, outputs: list[str] | None,
                 extra_data: dict, emit: Emit) -> None:
        self.ex, self.prompt, self.prompt_id = ex, prompt, prompt_id
        self.targets, self.extra_data, self.emit = outputs, extra_data, emit
        self.result = RunResult("success")
        self.entries: dict[str, CacheEntry] = {}
        self.nodes: dict[str, ResolvedNode] = {}
        self.keys: dict[str, str] = {}
        self.order: list[str] = []

    def send(self, kind: str, data: dict, *, record: bool = False) -> None:
        if record:
            self.result.messages.append([kind, data])
        self.emit(Event(kind, data))

    def go(self) -> RunResult:
        pid = self.prompt_id
        self.send("execution_start", {"prompt_id": pid, "timestamp": now_ms()}, record=True)
        vr = self.ex._validate(self.prompt, self.targets)
        if not vr.ok:
            return self._fail_validation(vr)
        self.nodes = vr.nodes
        self.order = vr.order
        self.keys = compute_keys(self.nodes, self.order, uuid.uuid4().hex)
        cache = self.ex.cache
        cache.pin(self.keys.values())
        cached = [nid for nid in self.order if self.keys[nid] in cache]
        for nid in cached:
            self.entries[nid] = cache.get(self.keys[nid])
        self.result.cached = cached
        self.send("execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": now_ms()}, record=True)
        outputs = set(vr.outputs)
        plan = needed_nodes(self.nodes, vr.outputs, lambda n: n in self.entries)
        try:
            for nid in self.order:
                if nid in plan and nid not in self.entries:
                    self.run_node(nid)
                elif nid in outputs and nid in self.entries:
                    self._report_ui(nid, self.entries[nid].ui)
        except Interrupted:
            self.result.status = "interrupted"
            nid = self._current_node
            self.send("execution_interrupted", {
                "prompt_id": pid, "node_id": nid, "node_type": self._type_of(nid),
                "executed": self._done(), "timestamp": now_ms()}, record=True)
        except NodeFailure as failure:
            self.result.status = "error"
            self.result.error = self._error_data(failure)
            self.send("execution_error", self.result.error, record=True)
        else:
            self.send("execution_success", {"prompt_id": pid, "timestamp": now_ms()}, record=True)
        self.send("executing", {"node": None, "display_node": None, "prompt_id": pid})
        return self.result

    _current_node: str | None = None

    # ---- one node -----------------------------------------------------------------------------------
    def run_node(self, nid: str) -> None:
        self.ex._check_interrupt()
        existing = self.ex.cache.get(self.keys[nid])    # a duplicate sub-graph computed earlier in this run
        if existing is not None:
            self.entries[nid] = existing
            self._report_ui(nid, existing.ui)    # a duplicated output node still shows its result
            return
        rn = self.nodes[nid]
        nd = rn.nodedef
        self._current_node = nid
        self.send("executing", {"node": nid, "display_node": nid, "prompt_id": self.prompt_id})
        inputs = self._gather(rn)
        try:
            if nd.check_lazy is not None:
                ran_before = len(self.result.executed)
                inputs = self._resolve_lazy(rn, inputs)
                if len(self.result.executed) != ran_before:   # its lazy branch ran: this node runs again now
                    self._current_node = nid
                    self.send("executing", {"node": nid, "display_node": nid, "prompt_id": self.prompt_id})
            token = _current.set(NodeContext(nid, self.prompt_id, self.ex._check_interrupt,
                                             self._progress_sink(nid), nd.name, self.emit))
            try:
                outputs, ui = _call_mapped(nd, inputs)
            finally:
                _current.reset(token)
        except (Interrupted, NodeFailure):
            raise
        except (Exception, SystemExit) as exc:   # a plugin calling sys.exit() fails its node, not the process
            raise NodeFailure(nid, nd, exc, inputs) from exc
        self.entries[nid] = self.ex.cache.put(self.keys[nid], outputs, ui, nd.name)
        self.result.executed.append(nid)
        self._report_ui(nid, ui)

    def _report_ui(self, nid: str, ui: dict | None) -> None:
        if ui is None:
            return
        self.result.outputs[nid] = ui
        self.result.meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
        self.send("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": self.prompt_id})

    def _progress_sink(self, nid: str):
        def sink(value: float, total: float, preview: Any) -> None:
            self.send("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": nid})
            if preview is not None:
                self.emit(Event("preview", {"node_id": nid, "prompt_id": self.prompt_id, "display_node_id": nid,
                                            "parent_node_id": None, "real_node_id": nid}, image=preview))
        # Previews are made only when enabled and when the receiver of the events wants them (an `emit`
        # may say so with a `wants_preview` callable: a server with no connected client does not).
        asks = getattr(self.emit, "wants_preview", None)
        sink.wants_preview = asks if (self.ex.previews and callable(asks)) else self.ex.previews
        return sink

    def _gather(self, rn: ResolvedNode) -> dict[str, list]:
        values: dict[str, list] = {}
        nd = rn.nodedef
        for name, decl in nd.inputs.items():
            if decl.section == "hidden":
                values[name] = [self._hidden(decl.spec.wire, rn.id)]
            elif name in rn.links:
                src, slot = rn.links[name]
                entry = self.entries.get(src)
                values[name] = entry.outputs[slot] if entry is not None else [None]
            elif name in rn.constants:
                values[name] = [rn.constants[name]]
        if nd.accepts_extra:
            for name, value in rn.constants.items():
                values.setdefault(name, [value])
        return values

    def _hidden(self, kind: str, nid: str) -> Any:
        if kind in ("PROMPT", "DYNPROMPT"):
            return self.prompt
        if kind == "EXTRA_PNGINFO":
            return self.extra_data.get("extra_pnginfo")
        if kind == "UNIQUE_ID":
            return nid
        return self.extra_data.get(kind.lower())

    def _resolve_lazy(self, rn: ResolvedNode, inputs: dict[str, list]) -> dict[str, list]:
        nd = rn.nodedef
        asked: set[str] = set()
        while True:
            pending = [n for n, (src, _s) in rn.links.items()
                       if nd.inputs.get(n) is not None and nd.inputs[n].spec.lazy and src not in self.entries]
            if not pending:
                return inputs
            first = {k: (v if nd.input_is_list else (v[0] if v else None)) for k, v in inputs.items()}
            wanted = [n for n in (nd.check_lazy(**first) or []) if n in pending and n not in asked]
            if not wanted:
                return inputs
            asked.update(wanted)
            sources = [rn.links[n][0] for n in wanted]
            sub = needed_nodes(self.nodes, sources, lambda n: n in self.entries)
            for nid in self.order:
                if nid in sub and nid not in self.entries:
                    self.run_node(nid)
            inputs = self._gather(rn)

    # ---- reporting ----------------------------------------------------------------------------------
    def _done(self) -> list[str]:
        return list(self.result.cached) + list(self.result.executed)

    def _type_of(self, nid: str | None) -> str | None:
        rn = self.nodes.get(nid) if nid else None
        return rn.nodedef.name if rn else None

    def _error_data(self, failure: NodeFailure) -> dict:
        exc = failure.exc
        cls = type(exc)
        kind = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        return {
            "prompt_id": self.prompt_id, "node_id": failure.node_id, "node_type": failure.nodedef.name,
            "executed": self._done(), "exception_message": f"{failure.nodedef.name} (node {failure.node_id}): {exc}",
            "exception_type": kind, "traceback": traceback.format_tb(exc.__traceback__),
            "current_inputs": {k: [_summary(v) for v in vals] for k, vals in failure.inputs.items()
                               if k not in ("prompt", "extra_pnginfo")},
            "current_outputs": list(self.entries), "timestamp": now_ms(),
        }

    def _fail_validation(self, vr) -> RunResult:
        self.result.status = "error"
        bad = next(iter(vr.node_errors), None)
        err = vr.error or {}
        self.result.error = {
            "prompt_id": self.prompt_id, "node_id": bad, "node_type": (vr.node_errors.get(bad) or {}).get("class_type"),
            "executed": [], "exception_message": f"{err.get('message', '')}: {err.get('details', '')}".strip(": "),
            "exception_type": "ValidationError", "traceback": [], "current_inputs": {}, "current_outputs": [],
            "node_errors": vr.node_errors, "timestamp": now_ms(),
        }
        self.send("execution_error", self.result.error, record=True)
        self.send("executing", {"node": None, "display_node": None, "prompt_id": self.prompt_id})
        return self.result


def _summary(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= 1000 else value[:1000] + "…"
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__}(shape={list(shape)}, dtype={getattr(value, 'dtype', '?')})"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


# ---- calling a node over lists ------------------------------------------------------------------

def _call_mapped(nd: NodeDef, inputs: dict[str, list]) -> tuple[list[list[Any]], dict | None]:
    n_out = len(nd.outputs)
    if nd.input_is_list:
        calls = [dict(inputs)]
    else:
        count = max((len(v) for v in inputs.values()), default=1)
        if any(len(v) == 0 for v in inputs.values()):
            count = 0
        calls = [{k: v[min(i, len(v) - 1)] for k, v in inputs.items()} for i in range(count)]
    slots: list[list[Any]] = [[] for _ in range(n_out)]
    ui: dict | None = None
    for kwargs in calls:
        result, call_ui = _normalize(nd, nd.fn(**kwargs))
        for k in range(n_out):
            if nd.outputs[k].is_list:
                slots[k].extend(result[k])
            else:
                slots[k].append(result[k])
        if call_ui is not None:
            ui = _merge_ui(ui, call_ui)
    return slots, ui


def _normalize(nd: NodeDef, ret: Any) -> tuple[tuple, dict | None]:
    n_out = len(nd.outputs)
    ui = None
    if isinstance(ret, NodeOutput):
        ret, ui = ret.result, ret.ui
        if n_out == 1 and not (isinstance(ret, tuple) and len(ret) == 1):
            ret = (ret,)
    elif isinstance(ret, dict) and ("ui" in ret or "result" in ret) and set(ret) <= {"ui", "result"}:
        ui, ret = ret.get("ui"), tuple(ret.get("result") or ())
    elif n_out == 1:
        ret = (ret,)
    if n_out == 0:
        return (), ui
    if not isinstance(ret, tuple) or len(ret) != n_out:
        raise TypeError(f"node {nd.name} must return {n_out} values, got {type(ret).__name__}")
    return tuple(ret), ui


def _merge_ui(a: dict | None, b: dict) -> dict:
    if a is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in b.items()}
    for k, v in b.items():
        if isinstance(v, list) and isinstance(a.get(k), list):
            a[k].extend(v)
        else:
            a[k] = v
    return a
