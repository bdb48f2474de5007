"""Tiny test nodes for the server tests (also loadable with `sdflow serve --nodes-module tests.server.plugin_nodes`).

Nodes that touch files find the input/output directories through the environment variables
SDFLOW_TEST_INPUT_DIR / SDFLOW_TEST_OUTPUT_DIR (set by the tests, in-process or for a subprocess).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Annotated

from PIL import Image

from engine.inputs import Combo, Float, Int, String
from engine.node import UI, node
from engine.paths import contained_path
from engine.progress import report


def _dir(kind: str) -> Path:
    return Path(os.environ[f"SDFLOW_TEST_{kind.upper()}_DIR"])


def _input_files() -> list[str]:
    try:
        return sorted(p.name for p in _dir("input").iterdir() if p.is_file())
    except (KeyError, FileNotFoundError):
        return []


@node("TestConst", category="test")
def const(value: Annotated[int, Int(0, min=-(2**53), max=2**53)]) -> int:
    return value


@node("TestAdd", category="test")
def add(a: Annotated[int, Int(0, min=-(2**53), max=2**53)], b: Annotated[int, Int(0, min=-(2**53), max=2**53)]) -> int:
    return a + b


@node("TestSlow", category="test")
def slow(value: Annotated[int, Int(0, min=-(2**53), max=2**53)], steps: Annotated[int, Int(5, min=1, max=1000)],
         delay: Annotated[float, Float(0.05, min=0.0, max=10.0)]) -> int:
    """Sleeps `steps` times, reporting progress with a small preview image each step."""
    for i in range(steps):
        time.sleep(delay)
        shade = int(255 * (i + 1) / steps)
        report(i + 1, steps, Image.new("RGB", (16, 16), (shade, 0, 0)))
    return value


@node("TestFail", category="test")
def fail(value: Annotated[int, Int(0, min=-(2**53), max=2**53)], message: Annotated[str, String("boom")]) -> int:
    raise ValueError(message)


@node("TestShow", category="test", output_node=True)
def show(value: Annotated[int, Int(0, min=-(2**53), max=2**53)]):
    return UI(text=[str(value)])


@node("TestSaveImage", category="test", output_node=True)
def save_image(value: Annotated[int, Int(0, min=-(2**53), max=2**53)], filename_prefix: Annotated[str, String("test")]):
    """Writes a 8x8 PNG whose red channel is value % 256 into the output dir."""
    out = _dir("output")
    out.mkdir(parents=True, exist_ok=True)
    name = f"{filename_prefix}_{value}_{time.time_ns()}.png"
    Image.new("RGB", (8, 8), (value % 256, 7, 9)).save(contained_path(out, name))
    return UI(images=[{"filename": name, "subfolder": "", "type": "output"}])


def _file_hash(image: str) -> str:
    return hashlib.sha256(contained_path(_dir("input"), image).read_bytes()).hexdigest()


@node("TestLoadImage", category="test", fingerprint=_file_hash)
def load_image(image: Annotated[str, Combo(_input_files, image_upload=True)]) -> int:
    """Opens an uploaded input image (name checked by containment) and returns its width * 1000 + height."""
    with Image.open(contained_path(_dir("input"), image)) as img:
        return img.size[0] * 1000 + img.size[1]
