"""The registry: built-in node modules plus plugins found through the `sdflow.nodes` entry-point group.

The plugin tests install a real (minimal) distribution into a temporary directory on sys.path, the way
pip lays one out (`<name>-<version>.dist-info/` with METADATA and entry_points.txt), so
importlib.metadata discovers it exactly as it would an installed third-party package.
"""
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from engine.cache import OutputCache
from engine.executor import Executor
from engine.registry import ENTRY_POINT_GROUP, Registry
from tests.engine import toy_nodes as t

PLUGIN_MODULES = ("sdflow_toyplug_mod", "sdflow_toyplug_list", "sdflow_toyplug_factory", "sdflow_toyplug_broken")


def install_distribution(root: Path, name: str, entry_points_txt: str, modules: dict[str, str]) -> None:
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points_txt))
    (info / "RECORD").write_text("")


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    install_distribution(
        tmp_path, "sdflow_toyplug",
        f"""
        [{ENTRY_POINT_GROUP}]
        toy_module = sdflow_toyplug_mod
        toy_list = sdflow_toyplug_list:NODES
        toy_factory = sdflow_toyplug_factory:make_nodes
        toy_broken = sdflow_toyplug_broken
        toy_missing = sdflow_toyplug_does_not_exist

        [console_scripts]
        not-a-node = sdflow_toyplug_mod:triple
        """,
        {
            "sdflow_toyplug_mod": """
                from engine.inputs import Int
                from engine.node import node

                @node("PluginTriple", category="plugin")
                def triple(x: Int(1, min=0, max=100)) -> int:
                    '''Multiplies by three.'''
                    return 3 * x

                def helper():          # not a node: ignored
                    return 1
            """,
            "sdflow_toyplug_list": """
                from engine.node import node

                @node("PluginNeg")
                def neg(x: int) -> int:
                    return -x

                NODES = [neg]
            """,
            "sdflow_toyplug_factory": """
                def make_nodes():
                    from engine.node import node

                    @node("PluginMade")
                    def made(text: str = "") -> str:
                        return text + "!"
                    return [made]
            """,
            "sdflow_toyplug_broken": """
                raise RuntimeError("this plugin is broken on purpose")
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in PLUGIN_MODULES:
        sys.modules.pop(mod, None)


def test_importlib_metadata_sees_the_installed_distribution(plugin_dir):
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"toy_module", "toy_list", "toy_factory", "toy_broken", "toy_missing"} <= names


def test_plugins_add_nodes_and_broken_plugins_are_reported(plugin_dir):
    reg = Registry.from_nodes(t)
    before = set(reg.names())
    loaded = reg.load_plugins()
    assert {"toy_module", "toy_list", "toy_factory"} <= set(loaded)
    assert "toy_broken" not in loaded and "toy_missing" not in loaded
    assert {"PluginTriple", "PluginNeg", "PluginMade"} <= set(reg.names()) - before
    assert before <= set(reg.names())
    # Broken plugins are recorded, not raised.
    assert reg.plugin_errors["toy_broken"] == "RuntimeError: this plugin is broken on purpose"
    assert reg.plugin_errors["toy_missing"].startswith("ModuleNotFoundError")
    assert "toy_module" not in reg.plugin_errors

    info = reg.object_info()["PluginTriple"]
    assert info["python_module"] == "custom_nodes.toy_module"
    assert info["description"] == "Multiplies by three." and info["category"] == "plugin"
    assert info["input"]["required"]["x"] == ["INT", {"default": 1, "min": 0, "max": 100}]
    assert reg.object_info()["PluginNeg"]["python_module"] == "custom_nodes.toy_list"


def test_plugin_nodes_run(plugin_dir):
    reg = Registry.from_nodes(t)
    reg.load_plugins()
    ex = Executor(reg, OutputCache({"cpu": 1 << 20}))
    prompt = {"1": {"class_type": "PluginTriple", "inputs": {"x": 5}},
              "2": {"class_type": "PluginNeg", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    res = ex.execute(prompt, "plug")
    assert res.status == "success" and res.outputs["3"] == {"values": [-15]}


def test_without_the_distribution_nothing_is_loaded():
    reg = Registry()
    reg.load_plugins(group="sdflow.test.no_such_group")
    assert len(reg) == 0 and reg.plugin_errors == {}


def test_from_nodes_accepts_modules_functions_nodedefs_and_lists():
    reg = Registry.from_nodes(t)
    for name in ("Const", "Add", "DivMod", "Show", "Choose", "MakeList", "SumList"):
        assert name in reg
    assert reg.get("Const").fn is t.const
    reg2 = Registry.from_nodes(t.const, [t.add, (t.show,)], t.divmod_node.__sdflow_node__)
    assert sorted(reg2.names()) == ["Add", "Const", "DivMod", "Show"]
    assert reg2.node_info("Add") == reg.node_info("Add")
    assert set(reg2.object_info()) == {"Add", "Const", "DivMod", "Show"}
    assert [nd.name for nd in reg2] == reg2.names()


def test_lookups_of_unknown_or_non_string_types():
    reg = Registry.from_nodes(t)
    assert reg.get("Nope") is None and "Nope" not in reg
    assert reg.get(["Const"]) is None and ["Const"] not in reg and 5 not in reg


def test_adding_something_that_is_not_a_node_fails():
    reg = Registry()
    with pytest.raises(TypeError):
        reg.add(42)
    with pytest.raises(TypeError):
        reg.add(lambda: None)


def test_later_registration_replaces_earlier():
    from engine.node import node

    @node("Const")
    def other_const(value: int) -> int:
        return -value

    reg = Registry.from_nodes(t)
    reg.add(other_const)
    assert reg.get("Const").fn is other_const
