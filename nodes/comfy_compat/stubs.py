"""Importable stand-ins for the parts of ComfyUI that sdflow does not provide.

A pack module often imports a dozen ComfyUI modules at its top and uses most of them in only a few nodes;
if the import failed, the whole pack (and its working nodes) would be lost. Every module under the ComfyUI
roots that sdflow has no shim for imports as a stub whose members are placeholder classes: defining a
subclass of one works, calling or instantiating one raises a clear NotSupportedBySdflow error.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

ROOTS = ("comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "comfy_config", "execution")
# Single modules of ComfyUI rather than packages: their lowercase members are functions, not submodules
# (`from execution import validate_prompt`, imported at load by rgthree-comfy and tinyterraNodes).
FLAT = ("execution",)


class NotSupportedBySdflow(NotImplementedError):
    """A ComfyUI internal that sdflow does not implement was used."""


class _PlaceholderMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if getattr(cls, "_sdflow_placeholder", None) is cls:
            raise NotSupportedBySdflow(f"{cls.__module__}.{cls.__qualname__} is not supported by sdflow")
        return super().__call__(*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(f"{cls.__module__}", f"{cls.__qualname__}.{name}")


def placeholder(module: str, qualname: str) -> type:
    """A class standing for `module.qualname`: subclassable, and raising when called."""
    cls = _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__module__": module, "__qualname__": qualname})
    cls._sdflow_placeholder = cls  # type: ignore[attr-defined]
    return cls


class StubModule(types.ModuleType):
    """A module whose missing members are placeholders (a root's lowercase names import submodules)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.__name__ in ROOTS and self.__name__ not in FLAT and name.islower():
            import importlib
            return importlib.import_module(f"{self.__name__}.{name}")
        value = placeholder(self.__name__, name)
        setattr(self, name, value)
        return value


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds every module under ROOTS that is not already in sys.modules, as a StubModule."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".", 1)[0] not in ROOTS:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = StubModule(spec.name)
        module.__path__ = []
        module.__sdflow_stub__ = True  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


FINDER = StubFinder()


def install_finder() -> None:
    if FINDER not in sys.meta_path:
        # First: a stray real `comfy` on sys.path would otherwise mix with the shims.
        sys.meta_path.insert(0, FINDER)
