"""A simulated accelerator for CPU-only test runs: torch's PrivateUse1 backend, renamed "sim", whose
tensors wrap CPU tensors. Modules really move there (`module.to("sim")`), their tensors report device
"sim:0", and every operation on them runs on the wrapped CPU data, so real models compute on it and the
memory accounting sees a second device kind, as it would a GPU.

Factory calls with device="sim" (torch.tensor, arange, zeros, ...) need `SimFactories()` entered in the
calling thread. Registering the backend is process-wide and happens once, on import.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

KIND = "sim"
if torch._C._get_privateuse1_backend_name() != KIND:
    _setup_privateuseone_for_python_backend(KIND)
DEVICE = torch.device(f"{KIND}:0")


class SimTensor(torch.Tensor):
    """A tensor on the simulated device; `raw` holds its data on the CPU."""

    raw: torch.Tensor

    @staticmethod
    def __new__(cls, raw: torch.Tensor) -> SimTensor:
        t = torch.Tensor._make_wrapper_subclass(cls, raw.shape, strides=raw.stride(), dtype=raw.dtype,
                                                device=DEVICE, requires_grad=raw.requires_grad,
                                                storage_offset=raw.storage_offset())
        t.raw = raw
        return t

    def __repr__(self) -> str:  # type: ignore[override]
        return f"SimTensor({self.raw!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        return _run(func, args, kwargs or {})


def _is_sim(device: Any) -> bool:
    return device is not None and torch.device(device).type == KIND


def _unwrap(x: Any) -> Any:
    return x.raw if isinstance(x, SimTensor) else x


def _wrap(x: Any) -> Any:
    return SimTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) else x


def _run(func: Any, args: Any, kwargs: dict) -> Any:
    to_sim = "device" in kwargs and _is_sim(kwargs["device"])
    leaving = "device" in kwargs and not to_sim and kwargs["device"] is not None
    if to_sim:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    any_sim = any(isinstance(a, SimTensor) for a in tree_leaves((args, kwargs)))
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if leaving and not to_sim:
        return out     # copied off the simulated device
    returns = func._schema.returns
    if returns and returns[0].alias_info is not None and returns[0].alias_info.is_write:
        return kwargs["out"] if "out" in kwargs else args[0]     # in place: the wrapper itself
    return tree_map(_wrap, out) if to_sim or any_sim else out


def _empty(size: Any, dtype: Any = None, layout: Any = None, device: Any = None, pin_memory: Any = None,
           memory_format: Any = None) -> SimTensor:
    return SimTensor(torch.empty(size, dtype=dtype, device="cpu", memory_format=memory_format))


def _empty_strided(size: Any, stride: Any, dtype: Any = None, layout: Any = None, device: Any = None,
                   pin_memory: Any = None) -> SimTensor:
    return SimTensor(torch.empty_strided(size, stride, dtype=dtype, device="cpu"))


def _copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    (dst.raw if isinstance(dst, SimTensor) else dst).copy_(_unwrap(src))
    return dst


_LIB = torch.library.Library("aten", "IMPL")
_LIB.impl("empty.memory_format", _empty, "PrivateUse1")
_LIB.impl("empty_strided", _empty_strided, "PrivateUse1")
_LIB.impl("_copy_from", _copy_from, "PrivateUse1")


class SimFactories(TorchFunctionMode):
    """Factory calls with device="sim" build on the CPU and move the result to the simulated device."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _is_sim(kwargs.get("device")) and not (args and isinstance(args[0], torch.Tensor)):
            out = func(*args, **{**kwargs, "device": "cpu"})
            return out.to(DEVICE) if isinstance(out, torch.Tensor) else out
        return func(*args, **kwargs)
