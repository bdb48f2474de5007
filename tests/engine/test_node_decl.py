"""A node's one Python declaration -> its `/object_info` entry (ComfyUI's shape) and its callable."""

import json
from typing import Annotated, Any, Literal, NamedTuple, Optional

import pytest

from engine.inputs import Combo, Hidden, Int, socket, types_match
from engine.node import NodeDef, node, nodedef_of
from engine.registry import Registry
from tests.engine import toy_nodes as t


@pytest.fixture()
def info() -> dict:
    return Registry.from_nodes(t).object_info()


def test_info_is_plain_json(info):
    # /object_info is served as JSON: every entry must survive a round trip unchanged.
    assert json.loads(json.dumps(info)) == info
    for entry in info.values():
        assert set(entry) >= {"input", "input_order", "output", "output_is_list", "output_name", "name",
                              "display_name", "description", "python_module", "category", "output_node"}


def test_int_widget_with_range_and_exact_entry(info):
    assert info["Const"] == {
        "input": {"required": {"value": ["INT", {"default": 0, "min": -1000, "max": 1000}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"],
        "output_is_list": [False],
        "output_name": ["INT"],
        "name": "Const",
        "display_name": "Const",
        "description": "An integer constant.",
        "python_module": "tests.engine.toy_nodes",
        "category": "math",
        "output_node": False,
    }
    assert info["Add"]["input"]["required"]["b"] == ["INT", {"default": 0, "min": -10**9, "max": 10**9, "step": 1}]
    # A plain `int` annotation is an INT widget with the ComfyUI default of 0.
    assert info["Add"]["input"]["required"]["a"] == ["INT", {"default": 0}]


def test_float_string_boolean_widgets(info):
    req = info["Seeded"]["input"]["required"]
    assert req["scale"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1, "round": 0.01}]
    w = info["Widgets"]["input"]
    assert w["required"]["text"] == ["STRING", {"default": "hi", "tooltip": "some text", "placeholder": "type here"}]
    assert w["required"]["flag"] == ["BOOLEAN", {"default": True, "label_on": "yes", "label_off": "no"}]
    assert info["Concat"]["input"]["required"]["a"] == ["STRING", {"default": "", "multiline": True}]
    # The Python default of a parameter becomes the widget default.
    assert info["Upper"]["input"]["required"]["enabled"] == ["BOOLEAN", {"default": True}]
    assert info["Scale"]["input"]["required"]["factor"][1]["default"] == 1.0


def test_required_optional_hidden_sections(info):
    w = info["Widgets"]
    assert list(w["input"]) == ["required", "optional", "hidden"]
    assert w["input"]["optional"] == {"extra": ["INT,FLOAT"]}
    assert w["input"]["hidden"] == {"pnginfo": "EXTRA_PNGINFO"}
    assert w["input_order"] == {"required": ["text", "flag"], "optional": ["extra"], "hidden": ["pnginfo"]}
    show = info["Show"]
    assert show["input"]["hidden"] == {"prompt": "PROMPT", "uid": "UNIQUE_ID"}
    assert show["input"]["required"] == {"value": ["*"]}
    assert info["Pick"]["input"]["optional"] == {"image": ["IMAGE"]}
    # A node without optional/hidden inputs has only the required section.
    assert list(info["Const"]["input"]) == ["required"]


def test_socket_types_inputs_and_outputs(info):
    assert info["InvertImage"]["input"]["required"] == {"image": ["IMAGE"]}
    assert info["InvertImage"]["output"] == ["IMAGE"]
    assert info["Scale"]["input"]["required"]["x"] == ["INT,FLOAT"]
    assert info["Scale"]["output"] == ["FLOAT"]
    assert info["Concat"]["output"] == ["STRING"]


def test_combo_static_literal_and_default(info):
    assert info["Concat"]["input"]["required"]["sep"] == [[" ", "-", ""], {"default": " "}]
    assert info["Pick"]["input"]["required"]["mode"] == [["a", "b"], {"default": "a"}]


def test_dynamic_combo_changes_between_calls(monkeypatch):
    reg = Registry.from_nodes(t)
    monkeypatch.setattr(t, "FILES", ["a.safetensors", "b.safetensors"])
    first = reg.object_info()["PickFile"]["input"]["required"]["name"]
    monkeypatch.setattr(t, "FILES", ["c.safetensors"])
    second = reg.object_info()["PickFile"]["input"]["required"]["name"]
    assert first == [["a.safetensors", "b.safetensors"]]
    assert second == [["c.safetensors"]]


def test_outputs_names_from_namedtuple_and_tooltips(info):
    assert info["DivMod"]["output"] == ["INT", "INT"]
    assert info["DivMod"]["output_name"] == ["quotient", "remainder"]
    assert info["DivMod"]["output_is_list"] == [False, False]
    assert info["Widgets"]["output"] == ["STRING", "BOOLEAN"]
    assert info["Widgets"]["output_name"] == ["text", "flag"]
    assert info["Widgets"]["output_tooltips"] == ["the text", "the flag"]
    assert "output_tooltips" not in info["DivMod"]
    assert info["MakeList"]["output_is_list"] == [True]


def test_output_node_category_display_name_description(info):
    assert info["Show"]["output_node"] is True and info["Show"]["output"] == []
    assert info["Const"]["output_node"] is False
    s = info["Seeded"]
    assert s["category"] == "test/seeds"
    assert s["display_name"] == "Seeded Number"
    # Only the docstring's first paragraph, joined onto one line.
    assert s["description"] == "Turns a seed into a number."
    assert info["Collect"]["description"].startswith("An output node with no hidden UNIQUE_ID, so its")
    assert "\n" not in info["Collect"]["description"]
    assert info["Concat"]["description"] == ""


def test_control_after_generate(info):
    assert info["Seeded"]["input"]["required"]["seed"] == [
        "INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}]
    assert "control_after_generate" not in info["Const"]["input"]["required"]["value"][1]


def test_lazy_inputs_are_flagged(info):
    req = info["Choose"]["input"]["required"]
    assert req["first"][1]["lazy"] is True and req["second"][1]["lazy"] is True
    assert "lazy" not in req["use_first"][1]


def test_node_function_still_callable_directly():
    t.CALLS.clear()
    assert t.const(5) == 5
    assert t.add(2, 3) == 5
    assert t.divmod_node(7, 2) == t.DivMod(3, 1)
    assert t.concat("a", "b", "-") == "a-b"
    assert t.seeded(4, 2.0) == 8
    assert t.CALLS == ["Const", "Add", "DivMod", "Concat", "Seeded"]
    nd = nodedef_of(t.const)
    assert isinstance(nd, NodeDef) and nd.fn is t.const and nd.name == "Const"


def test_declaration_errors_are_reported_at_decoration_time():
    with pytest.raises(TypeError, match="needs an annotation"):
        @node("NoAnnotation")
        def bad(x) -> int:
            return x

    with pytest.raises(TypeError, match="input 'x'"):
        @node("BadAnnotation")
        def bad2(x: dict) -> int:
            return 1

    with pytest.raises(ValueError):
        Hidden("NOT_A_KIND")


def test_fresh_declaration_round_trip():
    Latent = socket("LATENT", dict)

    class Pair(NamedTuple):
        samples: Latent
        count: int

    @node("Fresh", category="x/y", description="explicit text", output_node=True,
          output_is_list=[False, True])
    def fresh(samples: Latent, mode: Literal["fast", "slow"], n: Annotated[int, Int(2, min=1)] = 2,
              hint: Optional[str] = None, uid: Annotated[Any, Hidden("UNIQUE_ID")] = None) -> Pair:
        """Docstring ignored because description= is given."""
        return Pair(samples, [n])

    i = fresh.__sdflow_node__.info()
    assert i["input"] == {"required": {"samples": ["LATENT"], "mode": [["fast", "slow"]],
                                       "n": ["INT", {"default": 2, "min": 1}]},
                          "optional": {"hint": ["STRING", {"default": ""}]},
                          "hidden": {"uid": "UNIQUE_ID"}}
    assert i["output"] == ["LATENT", "INT"] and i["output_name"] == ["samples", "count"]
    assert i["output_is_list"] == [False, True]
    assert i["description"] == "explicit text" and i["category"] == "x/y" and i["output_node"] is True
    assert fresh({"x": 1}, "fast") == Pair({"x": 1}, [2])


def test_types_match_rule():
    assert types_match("INT", "INT")
    assert not types_match("INT", "IMAGE")
    assert types_match("*", "IMAGE") and types_match("IMAGE", "*")
    assert types_match("INT", "INT,FLOAT") and types_match("FLOAT,STRING", "INT,FLOAT")
    assert not types_match("STRING", "INT,FLOAT")


def test_combo_callable_is_read_every_time():
    seen = []

    def listing():
        seen.append(1)
        return ["x"]

    @node("ComboCount")
    def cc(name: Annotated[str, Combo(listing)]) -> str:
        return name

    nd = cc.__sdflow_node__
    nd.info()
    nd.info()
    assert len(seen) == 2
