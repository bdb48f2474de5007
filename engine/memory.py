"""Memory accounting for cached values, without importing torch.

A value's footprint is the bytes it holds per device ("cpu", "cuda:0", ...). Tensors are recognised by
duck typing; any other object can take part by defining `footprint() -> dict[str, int]` and
`to_device(device: str)` (loaded models do), so models and intermediate tensors share one budget.
"""
from __future__ import annotations

from typing import Any

Footprint = dict[str, int]


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "element_size") and hasattr(value, "nelement") and hasattr(value, "device")


def footprint(value: Any, _seen: set[int] | None = None) -> Footprint:
    seen = _seen if _seen is not None else set()
    out: Footprint = {}
    _walk(value, out, seen)
    return out


def _add(out: Footprint, device: str, nbytes: int) -> None:
    if nbytes:
        out[device] = out.get(device, 0) + nbytes


def _walk(value: Any, out: Footprint, seen: set[int]) -> None:
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return
    if id(value) in seen:
        return
    seen.add(id(value))
    if _is_tensor(value):
        try:
            storage = value.untyped_storage()
            key = storage.data_ptr()
            if key and key in seen:
                return
            seen.add(key)
            _add(out, str(value.device), storage.nbytes())
        except Exception:
            _add(out, str(value.device), value.element_size() * value.nelement())
        return
    own = getattr(value, "footprint", None)
    if callable(own) and not isinstance(value, type):
        for device, nbytes in own().items():
            _add(out, device, int(nbytes))
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
