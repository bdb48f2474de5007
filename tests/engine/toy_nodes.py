"""Small non-diffusion nodes the engine tests run: arithmetic, strings, an image-ish tensor node,
list and lazy nodes, and a few that misbehave on purpose. Each records its calls in CALLS."""
from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal, NamedTuple, Optional

import torch

from engine import progress
from engine.inputs import Boolean, Combo, Float, Hidden, Int, Lazy, String, socket
from engine.node import UI, NodeOutput, node

Image = socket("IMAGE", torch.Tensor)
Mask = socket("MASK", torch.Tensor)
Number = socket("INT,FLOAT", float)

CALLS: list[str] = []


def calls_of(name: str) -> int:
    return sum(1 for c in CALLS if c == name)


@node("Const", category="math")
def const(value: Annotated[int, Int(0, min=-1000, max=1000)]) -> int:
    """An integer constant."""
    CALLS.append("Const")
    return value


@node("Add", category="math")
def add(a: int, b: Annotated[int, Int(0, min=-10**9, max=10**9, step=1)]) -> int:
    CALLS.append("Add")
    return a + b


@node("Scale", category="math")
def scale(x: Number, factor: Annotated[float, Float(1.0, min=-100.0, max=100.0, step=0.5)] = 1.0) -> float:
    CALLS.append("Scale")
    return x * factor


class DivMod(NamedTuple):
    quotient: int
    remainder: int


@node("DivMod", category="math")
def divmod_node(a: int, b: int = 1) -> DivMod:
    CALLS.append("DivMod")
    return DivMod(*divmod(a, b))


@node("Concat", category="text")
def concat(a: Annotated[str, String("", multiline=True)], b: str = "",
           sep: Annotated[str, Combo([" ", "-", ""], default=" ")] = " ") -> str:
    CALLS.append("Concat")
    return f"{a}{sep}{b}"


@node("Upper", category="text")
def upper(text: str, enabled: Annotated[bool, Boolean(True)] = True) -> str:
    CALLS.append("Upper")
    return text.upper() if enabled else text


@node("SolidImage", category="image")
def solid_image(value: Annotated[float, Float(0.5, min=0.0, max=1.0)],
                size: Annotated[int, Int(8, min=1, max=64)] = 8) -> Image:
    CALLS.append("SolidImage")
    return torch.full((1, size, size, 3), value)


@node("InvertImage", category="image")
def invert_image(image: Image) -> Image:
    CALLS.append("InvertImage")
    return 1.0 - image


@node("BigTensor", category="image")
def big_tensor(megabytes: Annotated[int, Int(1, min=1, max=64)], tag: Annotated[int, Int(0)] = 0) -> Image:
    CALLS.append("BigTensor")
    return torch.zeros(megabytes * 262144, dtype=torch.float32)   # megabytes MiB


@node("Show", category="output", output_node=True)
def show(value: socket("*", object), prompt: Annotated[Any, Hidden("PROMPT")] = None,
         uid: Annotated[Any, Hidden("UNIQUE_ID")] = None) -> NodeOutput:
    CALLS.append("Show")
    shown = value.tolist() if hasattr(value, "tolist") and getattr(value, "numel", lambda: 99)() < 16 else value
    if hasattr(shown, "shape"):
        shown = list(shown.shape)
    return UI(text=[repr(shown)])


@node("PassThroughOut", category="output", output_node=True)
def pass_through_out(value: int) -> NodeOutput:
    CALLS.append("PassThroughOut")
    return NodeOutput((value,), {"value": [value]})


PassThroughOut_returns = None  # (typing helper below)
pass_through_out.__sdflow_node__.outputs.append(
    __import__("engine.node", fromlist=["OutputDecl"]).OutputDecl("INT", "INT"))


@node("Fail", category="test")
def fail(value: int, message: str = "boom") -> int:
    CALLS.append("Fail")
    raise ValueError(message)


@node("Slow", category="test")
def slow(value: int, steps: Annotated[int, Int(10, min=1, max=1000)] = 10,
         delay: Annotated[float, Float(0.01, min=0.0, max=5.0)] = 0.01) -> int:
    CALLS.append("Slow")
    for i in range(steps):
        time.sleep(delay)
        progress.report(i + 1, steps)
    return value


@node("Random", category="test", deterministic=False)
def random_node(low: int = 0) -> int:
    CALLS.append("Random")
    return low + int.from_bytes(os.urandom(2), "big")


def _file_stamp(path: str) -> str:
    return str(os.stat(path).st_mtime_ns) if os.path.exists(path) else "missing"


@node("ReadFile", category="test", fingerprint=lambda path: _file_stamp(path))
def read_file(path: str) -> str:
    CALLS.append("ReadFile")
    with open(path) as fh:
        return fh.read()


def _validate_even(value: int) -> bool | str:
    return True if value is None or value % 2 == 0 else f"{value} is odd"


@node("EvenOnly", category="test", validate=_validate_even)
def even_only(value: int) -> int:
    CALLS.append("EvenOnly")
    return value


# ---- lists ------------------------------------------------------------------------------------

@node("MakeList", category="list", output_is_list=True)
def make_list(start: int = 0, count: Annotated[int, Int(3, min=0, max=100)] = 3) -> int:
    CALLS.append("MakeList")
    return list(range(start, start + count))


@node("SumList", category="list", input_is_list=True)
def sum_list(values: int, offset: int = 0) -> int:
    CALLS.append("SumList")
    return sum(values) + offset[0]


# ---- lazy -------------------------------------------------------------------------------------

def _lazy_needs(use_first: bool, first=None, second=None) -> list[str]:
    return ["first"] if use_first else ["second"]


@node("Choose", category="lazy", check_lazy=_lazy_needs)
def choose(use_first: bool, first: Annotated[int, Lazy()] = None, second: Annotated[int, Lazy()] = None) -> int:
    CALLS.append("Choose")
    return first if use_first else second


@node("Pick", category="test")
def pick(mode: Literal["a", "b"] = "a", image: Optional[Image] = None) -> str:
    CALLS.append("Pick")
    return mode if image is None else f"{mode}+image"


# ---- added for the declaration / executor tests ---------------------------------------------------

@node("Seeded", category="test/seeds", display_name="Seeded Number")
def seeded(seed: Annotated[int, Int(0, min=0, max=2**64 - 1, control_after_generate=True)],
           scale: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.1, round=0.01)] = 1.0) -> int:
    """Turns a seed into a number.

    This second paragraph is not part of the description."""
    CALLS.append("Seeded")
    return int(seed * scale)


class Widgets(NamedTuple):
    text: str
    flag: bool


@node("Widgets", category="test", output_tooltips=["the text", "the flag"])
def widgets(text: Annotated[str, String("hi", placeholder="type here", tooltip="some text")],
            flag: Annotated[bool, Boolean(True, label_on="yes", label_off="no")],
            extra: Optional[Number] = None,
            pnginfo: Annotated[Any, Hidden("EXTRA_PNGINFO")] = None) -> Widgets:
    CALLS.append("Widgets")
    return Widgets(text, flag)


# A combo whose choices change at run time (like a folder listing): tests rewrite FILES.
FILES: list[str] = ["a.safetensors", "b.safetensors"]


@node("PickFile", category="test")
def pick_file(name: Annotated[str, Combo(lambda: list(FILES))]) -> str:
    CALLS.append("PickFile")
    return name


@node("Collect", category="output", output_node=True)
def collect(value: socket("*", object)) -> NodeOutput:
    """An output node with no hidden UNIQUE_ID, so its cache key is purely content-addressed."""
    CALLS.append("Collect")
    return UI(values=[value if isinstance(value, (int, float, str)) else repr(value)])


@node("PreviewSteps", category="test")
def preview_steps(value: int, steps: Annotated[int, Int(2, min=1, max=100)] = 2) -> int:
    CALLS.append("PreviewSteps")
    from PIL import Image as PILImage
    for i in range(steps):
        progress.report(i + 1, steps, PILImage.new("RGB", (4, 4), (i * 40, 0, 0)))
    return value


class ToyError(RuntimeError):
    """An exception type outside builtins, to check how execution_error names it."""


@node("FailCustom", category="test")
def fail_custom(value: int) -> int:
    CALLS.append("FailCustom")
    raise ToyError(f"custom failure {value}")


@node("Join3", category="image")
def join3(a: Image, b: Image, c: Image) -> float:
    """Needs three tensors at once (so all three must still be held when it runs)."""
    CALLS.append("Join3")
    return float(a.numel() + b.numel() + c.numel())


@node("Exit", category="test")
def exit_node(value: int) -> int:
    CALLS.append("Exit")
    raise SystemExit(3)
