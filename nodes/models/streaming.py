"""Partial loading: a model larger than the accelerator's room still runs.

The modules whose weights fit under a byte limit move to the compute device and stay; every other module
keeps its weights at home on the CPU and visits the compute device for its own forward only (a forward
pre-hook copies them in, a forward hook drops the copy), as ComfyUI's low-VRAM mode does. The split is by
modules that own tensors directly (linears, convolutions, norms), in the order the model declares them, so
the first blocks of a network are the resident ones.

The streamed weights keep their Parameter objects and shapes; between forwards they are CPU tensors, so
anything reading a weight outside a forward still finds it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _stores(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    return module._parameters, module._buffers


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    for store in _stores(module):
        for name, tensor in store.items():
            if tensor is not None:
                out.append((name, tensor))
    return out


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class PartialLoad:
    """The state of a partially loaded set of modules (see `load_partial`)."""

    device: torch.device
    resident: list[nn.Module] = field(default_factory=list)
    streamed: list[nn.Module] = field(default_factory=list)
    resident_bytes: int = 0
    streamed_bytes: int = 0
    visits: int = 0                   # streamed-module forwards so far (how often weights were copied in)
    copy_always: bool = False         # copy streamed weights even when home is the compute device (tests)
    _hooks: list[Any] = field(default_factory=list)

    def _visit(self, module: nn.Module, _args: Any) -> None:
        self.visits += 1
        device = self.device
        for store in _stores(module):
            for name, tensor in store.items():
                if tensor is None or "_sdflow_home_" + name in module.__dict__:
                    continue   # a module called again inside its own forward already has its weights
                if isinstance(tensor, nn.Parameter):
                    visiting = tensor.data.to(device, non_blocking=True, copy=self.copy_always)
                    setattr(module, "_sdflow_home_" + name, tensor.data)
                    tensor.data = visiting
                else:
                    setattr(module, "_sdflow_home_" + name, tensor)
                    store[name] = tensor.to(device, non_blocking=True, copy=self.copy_always)

    def _leave(self, module: nn.Module, _args: Any, _output: Any) -> None:
        for store in _stores(module):
            for name, tensor in store.items():
                home = module.__dict__.pop("_sdflow_home_" + name, None)
                if tensor is None or home is None:
                    continue
                if isinstance(tensor, nn.Parameter):
                    tensor.data = home
                else:
                    store[name] = home

    def release(self) -> None:
        """Undo the split: every streamed module's weights back at home (CPU), hooks removed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self.streamed:
            self._leave(module, (), None)   # in case a forward failed between its two hooks

    def home_tensors(self) -> Iterable[torch.Tensor]:
        for module in self.streamed:
            for _, tensor in _own_tensors(module):
                yield tensor


def load_partial(modules: Iterable[nn.Module], device: torch.device | str, resident_limit: int,
                 *, copy_always: bool = False) -> PartialLoad:
    """Move modules' weights to `device` in declaration order while they fit in `resident_limit` bytes;
    stream the rest from the CPU per forward. The modules must be on the CPU."""
    state = PartialLoad(torch.device(device), copy_always=copy_always)
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            own = _own_tensors(module)
            if not own or id(module) in seen:
                continue
            seen.add(id(module))
            size = sum(_nbytes(t) for _, t in own)
            if state.resident_bytes + size <= resident_limit and not state.streamed:
                _move_own(module, state.device)
                state.resident.append(module)
                state.resident_bytes += size
            else:
                # Once one module streams, all later ones do: resident blocks stay one contiguous front.
                state.streamed.append(module)
                state.streamed_bytes += size
                state._hooks.append(module.register_forward_pre_hook(state._visit))
                state._hooks.append(module.register_forward_hook(state._leave))
    return state


def _move_own(module: nn.Module, device: torch.device) -> None:
    for store in _stores(module):
        for name, tensor in store.items():
            if tensor is None:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(device)
            else:
                store[name] = tensor.to(device)
