"""How a running node reports progress and learns about an interrupt, without the executor in its
signature: the executor sets a context for the node it runs, and long loops call `report()` each step
(which raises `Interrupted` when the prompt was interrupted)."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable


class Interrupted(Exception):
    """The running prompt was interrupted (POST /interrupt, or the executor's interrupt())."""


@dataclass
class NodeContext:
    node_id: str
    prompt_id: str
    check_interrupt: Callable[[], None]
    on_progress: Callable[[float, float, Any], None]
    node_type: str = ""
    emit: Callable[[Any], None] | None = None    # the run's event sink, for nodes that stream data to clients


_current: contextvars.ContextVar[NodeContext | None] = contextvars.ContextVar("sdflow_node", default=None)


def current() -> NodeContext | None:
    return _current.get()


def report(value: float, total: float, preview: Any = None) -> None:
    """Progress of the running node (e.g. sampler step `value` of `total`), with an optional preview
    image. Checks for an interrupt first. Outside an execution it does nothing."""
    ctx = _current.get()
    if ctx is None:
        return
    ctx.check_interrupt()
    ctx.on_progress(value, total, preview)


def check_interrupt() -> None:
    ctx = _current.get()
    if ctx is not None:
        ctx.check_interrupt()


def wants_preview() -> bool:
    """Whether anyone listens for previews, so nodes can skip making them."""
    ctx = _current.get()
    if ctx is None:
        return False
    flag = getattr(ctx.on_progress, "wants_preview", True)
    return bool(flag()) if callable(flag) else bool(flag)


def emit_event(event: Any) -> bool:
    """Hand an `engine.events.Event` from the running node to the run's receiver (e.g. the websocket
    hub); False outside an execution."""
    ctx = _current.get()
    if ctx is None or ctx.emit is None:
        return False
    ctx.emit(event)
    return True
