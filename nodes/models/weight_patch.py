"""Weights patched in place: one base module, many patch lists, one applied at a time.

A patched "model" is meant to be a cheap handle (its base weights plus a hashable patch key); the
weights are written when that handle runs, into the base module's own tensors (on whatever device they
live, so data pointers and the module's footprint do not change). Before writing, the original of
each tensor about to change is kept, and only those: switching to another patch list (another LoRA,
another strength) first restores them byte for byte, so the cost of a patch is its touched tensors,
never a second module. `restore()` gives back the exact original bytes.

The caller serialises use: a module patched for one key must not be run for another key at the same
time (the holder's lock, taken around `sync` and the forward that follows, is the intended guard).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping

import torch
from torch import nn

# Given the module's current (unpatched) parameters by name, the new values of those to change.
PatchFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class InPlacePatcher:
    """Applies one patch list at a time to `module`'s parameters, in place."""

    def __init__(self, module: nn.Module, lock: threading.RLock | None = None) -> None:
        self.module = module
        self.lock = lock or threading.RLock()
        self.key: Hashable = ()                          # () = unpatched
        self._originals: dict[str, torch.Tensor] = {}    # parameter name -> its bytes before patching

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def sync(self, key: Hashable, patch: PatchFn | None) -> nn.Module:
        """Make the module hold the weights of `key` (computed by `patch` from the originals when the
        key differs from the one applied); `key` () / `patch` None means the unpatched weights."""
        with self.lock:
            if key == self.key:
                return self.module
            self.restore()
            if patch is None or key == ():
                return self.module
            params = self._params()
            with torch.no_grad():
                new = patch({name: p.detach() for name, p in params.items()})
                for name, value in new.items():   # all checked before any is written
                    if name not in params or value.shape != params[name].shape:
                        raise ValueError(f"patch for {name} has shape {tuple(value.shape)}, the weight "
                                         f"{tuple(params[name].shape) if name in params else 'does not exist'}")
                for name, value in new.items():
                    param = params[name]
                    # the original lives next to the weight: restoring is a same-device copy
                    self._originals[name] = param.detach().clone()
                    param.data.copy_(value.to(param.dtype))
            self.key = key
            return self.module

    def restore(self) -> None:
        """Put back the exact original bytes of every patched tensor."""
        with self.lock:
            if self._originals:
                params = self._params()
                with torch.no_grad():
                    for name, original in self._originals.items():
                        params[name].data.copy_(original)   # copy_ moves across devices if the module moved
                self._originals.clear()
            self.key = ()

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The module's parameters as they were before any patch (the kept originals for patched ones)."""
        with self.lock:
            return {name: self._originals.get(name, p.detach()) for name, p in self._params().items()}

    def originals(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._originals.values())

    def extra_bytes(self) -> int:
        """What the applied patch costs beyond the module: the kept originals."""
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    @property
    def patched(self) -> tuple[str, ...]:
        return tuple(self._originals)


def chain(*patches: PatchFn) -> PatchFn:
    """One patch applying `patches` in order, each seeing the weights the previous ones left (a LoRA
    stacked on a merge, two LoRAs)."""
    def apply(weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        current = dict(weights)
        changed: dict[str, torch.Tensor] = {}
        for patch in patches:
            new = patch(current)
            current.update(new)
            changed.update(new)
        return changed
    return apply
