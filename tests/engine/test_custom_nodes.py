"""Custom-node packs loaded from a folder as ComfyUI lays them out: package and single-file packs, a pack
that fails to import beside ones that load, built-in names protected, WEB_DIRECTORY found, disabled packs
skipped, and the loaded nodes run by the executor."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from engine.cache import OutputCache
from engine.custom_nodes import discover, load_packs
from engine.executor import Executor
from engine.registry import Registry
from tests.engine import toy_nodes

PACKAGE_INIT = '''
from .nodes import Greeter
from . import helpers   # relative import of the pack's own module
WEB_DIRECTORY = "./js"
NODE_CLASS_MAPPINGS = {"Greeter": Greeter, "Const": Greeter}   # "Const" is a built-in: refused
NODE_DISPLAY_NAME_MAPPINGS = {"Greeter": "Greeter (pack)"}
'''

PACKAGE_NODES = '''
from .helpers import shout

class Greeter:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "world"})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "greet"
    OUTPUT_NODE = True
    CATEGORY = "greetings"
    def greet(self, name):
        return {"ui": {"text": [shout("hello " + name)]}, "result": (name,)}
'''

SINGLE_FILE = '''
class Doubler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 2, "min": 0})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    def run(self, value):
        return {"ui": {"value": [value * 2]}, "result": (value * 2,)}
NODE_CLASS_MAPPINGS = {"Doubler": Doubler}
'''


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture()
def custom_nodes(tmp_path: Path) -> Path:
    root = tmp_path / "custom_nodes"
    write(root / "greeter-pack" / "__init__.py", PACKAGE_INIT)
    write(root / "greeter-pack" / "nodes.py", PACKAGE_NODES)
    write(root / "greeter-pack" / "helpers.py", "def shout(s):\n    return s.upper()\n")
    write(root / "greeter-pack" / "js" / "ext.js", "console.log('pack');\n")
    write(root / "broken-pack" / "__init__.py", "import a_module_that_does_not_exist\n")
    write(root / "exits-pack" / "__init__.py", "raise SystemExit(3)\n")
    write(root / "doubler.py", SINGLE_FILE)
    write(root / "old-pack.disabled" / "__init__.py", "raise RuntimeError('must not be imported')\n")
    write(root / "README.md", "not a pack\n")
    yield root
    for name in ("greeter-pack", "greeter-pack.nodes", "greeter-pack.helpers", "doubler"):
        sys.modules.pop(name, None)


def test_packs_load_in_isolation_and_run(custom_nodes: Path):
    assert [p.name for p in discover([custom_nodes])] == ["broken-pack", "doubler.py", "exits-pack", "greeter-pack"]
    registry = Registry.from_nodes(toy_nodes)
    prepared = []
    packs = {p.name: p for p in load_packs([custom_nodes], registry, prepare=lambda: prepared.append(1))}
    assert prepared == [1]
    assert not packs["broken-pack"].ok and "ModuleNotFoundError" in packs["broken-pack"].error
    assert "a_module_that_does_not_exist" in packs["broken-pack"].error
    assert not packs["exits-pack"].ok and "SystemExit" in packs["exits-pack"].error
    greeter = packs["greeter-pack"]
    assert greeter.ok and greeter.nodes == ["Greeter"]
    assert greeter.skipped and "Const" in greeter.skipped[0]
    assert greeter.web_directory == (custom_nodes / "greeter-pack" / "js").resolve()
    assert packs["doubler"].nodes == ["Doubler"]
    assert registry.get("Const").python_module != "custom_nodes.greeter-pack"
    info = registry.node_info("Greeter")
    assert info["display_name"] == "Greeter (pack)" and info["python_module"] == "custom_nodes.greeter-pack"

    ex = Executor(registry, OutputCache({"cpu": 1 << 24}))
    result = ex.execute({"1": {"class_type": "Greeter", "inputs": {"name": "sdflow"}},
                         "2": {"class_type": "Doubler", "inputs": {"value": 21}}}, "p")
    assert result.status == "success", result.error
    assert result.outputs["1"] == {"text": ["HELLO SDFLOW"]} and result.outputs["2"] == {"value": [42]}


def test_no_folder_means_nothing_loaded(tmp_path: Path):
    registry = Registry()
    assert load_packs([tmp_path / "missing"], registry, prepare=lambda: pytest.fail("nothing to prepare")) == []
