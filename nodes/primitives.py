"""Primitive nodes (ComfyUI's comfy_extras/nodes_primitive.py): a constant of one type, as a node."""
from __future__ import annotations

import sys
from typing import Annotated

from engine.inputs import Boolean, Float, Int, String
from engine.node import node


@node("PrimitiveString", category="utils/primitive", display_name="String")
def primitive_string(value: Annotated[str, String("")]) -> str:
    return value


@node("PrimitiveStringMultiline", category="utils/primitive", display_name="String (Multiline)")
def primitive_string_multiline(value: Annotated[str, String("", multiline=True)]) -> str:
    return value


@node("PrimitiveInt", category="utils/primitive", display_name="Int")
def primitive_int(value: Annotated[int, Int(0, min=-sys.maxsize, max=sys.maxsize, control_after_generate=True)]) -> int:
    return value


@node("PrimitiveFloat", category="utils/primitive", display_name="Float")
def primitive_float(value: Annotated[float, Float(0.0, min=-sys.maxsize, max=sys.maxsize)]) -> float:
    return value


@node("PrimitiveBoolean", category="utils/primitive", display_name="Boolean")
def primitive_boolean(value: Annotated[bool, Boolean(False)]) -> bool:
    return value
