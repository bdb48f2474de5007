"""Makes the real spandrel importable in tests on machines where torchvision's wheel cannot load its compiled
operators (its registry build here fails with `operator torchvision::nms does not exist`).

torchvision's Python side registers fake (meta) kernels for `torchvision::nms` and `torchvision::qnms` while it
is imported, which fails when the C++ library that defines those operators did not load. Defining just the
two schemas first lets the import finish; nothing spandrel's upscalers run calls them. Test code only: the
product imports spandrel lazily and reports a broken torchvision as a clear error (nodes/models/upscale.py).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib: torch.library.Library | None = None


def _define_missing_torchvision_ops() -> None:
    global _lib
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if missing and _lib is None:
        _lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _lib.define(_SCHEMAS[name])


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def prepare_torchvision() -> None:
    """Call before anything imports torchvision (diffusers and transformers do when it is installed)."""
    if importlib.util.find_spec("torchvision") is not None:
        _define_missing_torchvision_ops()


def require_spandrel() -> Any:
    """The real spandrel, through the product's lazy import (which also finds `make setup`'s extras folder).
    Skipped, saying why, only where spandrel is installed nowhere; where it is, a failed import fails the test."""
    from nodes.models.upscale import EXTRAS_DIR, import_spandrel
    if importlib.util.find_spec("spandrel") is None and not (EXTRAS_DIR / "spandrel").is_dir():
        pytest.skip("spandrel is not installed (make setup puts it in .venv/extras/upscale; "
                    "or pip install 'sdflow[upscale]')")
    _define_missing_torchvision_ops()
    return import_spandrel()
