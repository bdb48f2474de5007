"""Memory accounting for cached values, without importing torch.

A value's footprint is the bytes it holds per device ("cpu", "cuda:0", ...), built from its memory parts
(one per tensor storage), so memory shared between values is recognised. Tensors are found by duck
typing; any other object can take part by defining `memory_parts()` (or just `footprint() -> {device:
bytes}`) and `to_device(device: str)` (loaded models do), so models and intermediate tensors share one
budget.
"""
from __future__ import annotations

from collections.abc import Hashable
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
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(move(v, device) for v in value)
    return value


def default_budgets() -> dict[str, int]:
    """Automatic budgets: a third of system RAM for CPU-resident outputs, 70% of each GPU."""
    budgets: dict[str, int] = {}
    try:
        import psutil
        budgets["cpu"] = int(psutil.virtual_memory().total // 3)
    except Exception:
        budgets["cpu"] = 4 << 30
    budgets["cuda"] = _cuda_budget()
    return budgets


def _cuda_budget() -> int:
    import sys
    torch = sys.modules.get("torch")  # only ask torch if someone already loaded it
    try:
        if torch is not None and torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory * 0.7)
    except Exception:
        pass
    return 0
