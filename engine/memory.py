"""Memory accounting for cached values, without importing torch.

A value's footprint is the bytes it holds per device ("cpu", "cuda:0", ...), built from its memory parts
(one per tensor storage), so memory shared between values is recognised. Tensors are found by duck
typing; any other object can take part by defining `memory_parts()` (or just `footprint() -> {device:
bytes}`) and `to_device(device: str)` (loaded models do), so models and intermediate tensors share one
budget.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

Footprint = dict[str, int]


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "element_size") and hasattr(value, "nelement") and hasattr(value, "device")


# A value's memory as parts: identity of a block of memory -> (device, bytes). Two cached values that
# share memory (a LoRA-patched model shares every untouched weight with its base; a CLIP clone shares
# all of them) name the same parts, so the cache counts that memory once.
Parts = dict[Hashable, tuple[str, int]]


def tensor_part(tensor: Any) -> tuple[Hashable, tuple[str, int]]:
    device = str(tensor.device)
    try:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        return (("storage", device, ptr) if ptr else ("tensor", id(tensor))), (device, storage.nbytes())
    except Exception:
        return ("tensor", id(tensor)), (device, tensor.element_size() * tensor.nelement())


def parts(value: Any) -> Parts:
    """The memory `value` holds. Objects take part with `memory_parts() -> Parts`, or more coarsely with
    `footprint() -> {device: bytes}` (counted as their own, unshared memory)."""
    out: Parts = {}
    _walk(value, out, set())
    return out


def footprint(value: Any) -> Footprint:
    return sum_parts(parts(value))


def sum_parts(value_parts: Parts) -> Footprint:
    total: Footprint = {}
    for device, nbytes in value_parts.values():
        if nbytes:
            total[device] = total.get(device, 0) + nbytes
    return total


def _walk(value: Any, out: Parts, seen: set[int]) -> None:
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return
    if id(value) in seen:
        return
    seen.add(id(value))
    if _is_tensor(value):
        key, part = tensor_part(value)
        out[key] = part
        return
    own_parts = getattr(value, "memory_parts", None)
    if callable(own_parts) and not isinstance(value, type):
        out.update(own_parts())
        return
    own = getattr(value, "footprint", None)
    if callable(own) and not isinstance(value, type):
        for device, nbytes in own().items():
            out[("object", id(value), device)] = (device, int(nbytes))
        return
    if isinstance(value, dict):
        for item in value.values():
            _walk(item, out, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, out, seen)


def device_kind(device: str) -> str:
    """'cuda:0' -> 'cuda'; budgets are given per kind and apply to each device of that kind."""
    return device.split(":", 1)[0]


def move(value: Any, device: str) -> Any:
    """Return `value` with its tensors on `device`; objects with `to_device` are moved in place."""
    if _is_tensor(value):
        return value.to(device)
    mover = getattr(value, "to_device", None)
    if callable(mover) and not isinstance(value, type):
        mover(device)
        return value
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [move(v, device) for v in value]
    if isinstance(value, tuple):
        moved = [move(v, device) for v in value]
        # NamedTuples (multi-output nodes) are rebuilt as their own type, so what the walker counts the
        # mover can move.
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


# ---- one owner of device memory ------------------------------------------------------------------
# Values move between devices outside the cache (a model's first use moves its weights to the GPU in
# place). Whatever moves memory says so here, before (`request_room`: evict or offload least recently used
# entries so the move fits the budget) and after (`notify_moved`: re-measure), so the accounting always
# says where every cached byte lives. Accountants register weakly: a dropped cache stops listening.

class MemoryAccountant:
    """What a cache implements to follow moves it did not make."""

    def make_room(self, kind: str, nbytes: int) -> None: ...

    def moved(self, value: Any) -> None: ...


_accountants: weakref.WeakSet[Any] = weakref.WeakSet()
_accountants_lock = threading.Lock()


def register_accountant(accountant: Any) -> None:
    with _accountants_lock:
        _accountants.add(accountant)


def _each_accountant() -> list[Any]:
    with _accountants_lock:
        return list(_accountants)


def request_room(device: str, nbytes: int) -> None:
    """About to put `nbytes` on `device`: let every accountant free room for it first."""
    kind = device_kind(device)
    for accountant in _each_accountant():
        accountant.make_room(kind, nbytes)


def room(device: str) -> int | None:
    """Bytes that may still go onto `device` under the tightest accountant's budget (None: no budget)."""
    kind = device_kind(device)
    rooms = [r for r in (getattr(a, "room", lambda _k: None)(kind) for a in _each_accountant()) if r is not None]
    return min(rooms) if rooms else None


def notify_moved(value: Any) -> None:
    """`value` (a model handle, its weights) has moved: accountants re-measure what holds it."""
    for accountant in _each_accountant():
        accountant.moved(value)


# ---- budgets ------------------------------------------------------------------------------------------
ACCELERATOR_RESERVE = 0.10   # of the accelerator's total, left for activations and other processes
MIN_RESERVE = 512 << 20


def default_budgets() -> dict[str, int]:
    """Automatic budgets: a third of system RAM for CPU-resident outputs; on each accelerator kind, the
    memory measured free at start (what other processes hold is not ours) minus a reserve."""
    budgets: dict[str, int] = {}
    try:
        import psutil
        budgets["cpu"] = int(psutil.virtual_memory().total // 3)
    except Exception:
        budgets["cpu"] = 4 << 30
    budgets.update(accelerator_budgets())
    return budgets


def accelerator_budgets(measure: Callable[[], dict[str, tuple[int, int]]] | None = None) -> dict[str, int]:
    """Budget per accelerator kind from (free, total) bytes as measured; `measure` is for tests."""
    readings = (measure or _measure_accelerators)()
    budgets = {"cuda": 0}
    for kind, (free, total) in readings.items():
        reserve = max(int(total * ACCELERATOR_RESERVE), MIN_RESERVE)
        budgets[kind] = max(0, int(free) - reserve)
    return budgets


def _measure_accelerators() -> dict[str, tuple[int, int]]:
    import sys
    torch = sys.modules.get("torch")  # only ask torch if someone already loaded it
    out: dict[str, tuple[int, int]] = {}
    if torch is None:
        return out
    try:
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(0)
            out["cuda"] = (int(free), int(total))
    except Exception:
        pass
    try:
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            free, total = xpu.mem_get_info(0)
            out["xpu"] = (int(free), int(total))
    except Exception:
        pass
    try:
        mps = getattr(torch, "mps", None)
        if mps is not None and torch.backends.mps.is_available():
            total = int(mps.recommended_max_memory())
            out["mps"] = (total - int(mps.driver_allocated_memory()), total)
    except Exception:
        pass
    return out
