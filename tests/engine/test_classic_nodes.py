"""ComfyUI classic node classes (INPUT_TYPES / RETURN_TYPES / FUNCTION ...) as sdflow NodeDefs, run by the
real executor: schema, validation, caching with IS_CHANGED, VALIDATE_INPUTS, lazy inputs, lists, any-type and
any-input tricks, per-node instances."""
from __future__ import annotations

import math

import pytest

from engine.cache import OutputCache
from engine.classic import ClassicNodeError, nodedef_from_class
from engine.executor import Executor
from engine.registry import Registry
from engine.validation import validate_prompt

CALLS: list[str] = []


class AnyType(str):
    """The any-type trick of many packs: equal to every type."""

    def __ne__(self, other: object) -> bool:
        return False


class ContainsAnything(dict):
    """The any-input trick: an optional section that claims to hold every key."""

    def __contains__(self, key: object) -> bool:
        return True


class MakeNumber:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 3, "min": 0, "max": 100, "step": 1}),
                             "mode": (["add", "mul"],)},
                "optional": {"scale": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 10.0, "step": 0.5})}}

    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("number", "label")
    FUNCTION = "make"
    CATEGORY = "tests/classic"
    DESCRIPTION = "Makes a number."

    def make(self, value, mode, scale=1.5):
        CALLS.append("make")
        number = value + 1 if mode == "add" else value * 2
        return (number, f"{mode}:{number}:{scale}")


class ShowText:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    def show(self, text, unique_id=None, prompt=None):
        CALLS.append("show")
        return {"ui": {"text": [text], "node": [unique_id]}, "result": ()}


class FileStamp:
    """IS_CHANGED over a constant: the cache follows what it returns; NaN means always re-run."""

    stamp = "v1"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "a"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "read"

    @classmethod
    def IS_CHANGED(cls, name):
        return math.nan if name == "always" else cls.stamp

    def read(self, name):
        CALLS.append("read")
        return (f"{name}@{self.stamp}",)


class Strict:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 1, "min": 0, "max": 10})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    @classmethod
    def VALIDATE_INPUTS(cls, count):
        return True if count % 2 == 0 else "count must be even"

    def go(self, count):
        return (count,)


class Switch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"use_first": ("BOOLEAN", {"default": True}),
                             "first": (AnyType("*"), {"lazy": True}),
                             "second": (AnyType("*"), {"lazy": True})}}

    RETURN_TYPES = (AnyType("*"),)
    FUNCTION = "pick"

    def check_lazy_status(self, use_first, first=None, second=None):
        return ["first"] if use_first else ["second"]

    def pick(self, use_first, first=None, second=None):
        return (first if use_first else second,)


class Collect:
    """INPUT_IS_LIST / OUTPUT_IS_LIST and an any-input optional section."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"items": ("INT", {"forceInput": True})}, "optional": ContainsAnything()}

    INPUT_IS_LIST = True
    RETURN_TYPES = ("INT", "INT")
    OUTPUT_IS_LIST = (False, True)
    FUNCTION = "collect"

    def collect(self, items, **extra):
        return (sum(items), [i * 10 for i in items])


class Counter:
    """State on the instance: ComfyUI keeps one object per node id."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tick": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "count"
    NOT_IDEMPOTENT = True

    def __init__(self):
        self.n = 0

    def count(self, tick):
        self.n += 1
        return (self.n,)


class Items:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 3})}}

    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "items"

    def items(self, n):
        return (list(range(1, n + 1)),)


CLASSES = {"MakeNumber": MakeNumber, "ShowText": ShowText, "FileStamp": FileStamp, "Strict": Strict,
           "Switch": Switch, "Collect": Collect, "Counter": Counter, "Items": Items}


@pytest.fixture()
def ex() -> Executor:
    CALLS.clear()
    FileStamp.stamp = "v1"
    reg = Registry.from_nodes([nodedef_from_class(k, v, python_module="custom_nodes.test_pack")
                               for k, v in CLASSES.items()])
    return Executor(reg, OutputCache({"cpu": 1 << 26}))


def n(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def test_schema_matches_comfyui_object_info_shape(ex):
    info = ex.registry.node_info("MakeNumber")
    assert info["input"]["required"]["value"] == ["INT", {"default": 3, "min": 0, "max": 100, "step": 1}]
    assert info["input"]["required"]["mode"][0] == ["add", "mul"]
    assert info["input"]["optional"]["scale"][1]["step"] == 0.5
    assert info["output"] == ["INT", "STRING"] and info["output_name"] == ["number", "label"]
    assert info["category"] == "tests/classic" and info["description"] == "Makes a number."
    assert info["python_module"] == "custom_nodes.test_pack"
    show = ex.registry.node_info("ShowText")
    assert show["output_node"] is True and show["input"]["hidden"] == {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}
    assert show["input"]["required"]["text"] == ["STRING", {"default": "", "forceInput": True}]
    assert ex.registry.node_info("Switch")["output"] == ["*"]


def test_runs_with_ui_results_hidden_inputs_and_validation(ex):
    prompt = {"1": n("MakeNumber", value=4, mode="mul"), "2": n("ShowText", text=["1", 1])}
    result = ex.execute(prompt, "p1")
    assert result.status == "success", result.error
    assert result.outputs["2"] == {"text": ["mul:8:1.5"], "node": ["2"]}
    bad = validate_prompt({"1": n("MakeNumber", value=400, mode="pow"), "2": n("ShowText", text=["1", 1])},
                          ex.registry)
    kinds = {e["type"] for e in bad.node_errors["1"]["errors"]}
    assert {"value_bigger_than_max", "value_not_in_list"} <= kinds


def test_is_changed_drives_the_cache_and_nan_always_reruns(ex):
    prompt = {"1": n("FileStamp", name="a"), "2": n("ShowText", text=["1", 0])}
    ex.execute(prompt, "a1")
    ex.execute(prompt, "a2")
    assert CALLS.count("read") == 1                       # same IS_CHANGED value: cached
    FileStamp.stamp = "v2"
    assert ex.execute(prompt, "a3").outputs["2"]["text"] == ["a@v2"]
    assert CALLS.count("read") == 2
    always = {"1": n("FileStamp", name="always"), "2": n("ShowText", text=["1", 0])}
    ex.execute(always, "b1")
    ex.execute(always, "b2")
    assert CALLS.count("read") == 4


def test_validate_inputs_replaces_the_builtin_checks(ex):
    odd = validate_prompt({"1": n("Strict", count=3), "2": n("ShowText", text=["1", 0])}, ex.registry)
    assert not odd.ok and "count must be even" in str(odd.node_errors["1"])
    # The validator takes `count`, so the built-in max of 10 is not applied (ComfyUI's rule).
    big = validate_prompt({"1": n("Strict", count=12), "2": n("ShowText", text=["1", 0])}, ex.registry)
    assert "1" not in big.node_errors


def test_lazy_any_type_inputs_evaluate_only_the_branch_asked_for(ex):
    prompt = {"1": n("MakeNumber", value=1, mode="add"), "2": n("FileStamp", name="never"),
              "3": n("Switch", use_first=True, first=["1", 1], second=["2", 0]), "4": n("ShowText", text=["3", 0])}
    result = ex.execute(prompt, "l1")
    assert result.status == "success", result.error
    assert result.outputs["4"]["text"] == ["add:2:1.5"] and "read" not in CALLS


def test_list_inputs_outputs_and_any_input_section(ex):
    prompt = {"1": n("Items", n=3), "2": n("Collect", items=["1", 0], anything="goes"),
              "3": n("MakeNumber", value=["2", 1], mode="add"), "4": n("ShowText", text=["3", 1])}
    result = ex.execute(prompt, "c1")
    assert result.status == "success", result.error
    assert result.outputs["4"]["text"] == ["add:11:1.5", "add:21:1.5", "add:31:1.5"]
    assert ex.registry.get("Collect").accepts_extra


def test_one_instance_per_node_id_keeps_state(ex):
    prompt = {"1": n("Counter", tick=0), "2": n("Counter", tick=0), "3": n("MakeNumber", value=["1", 0], mode="add"),
              "4": n("ShowText", text=["3", 1]), "5": n("MakeNumber", value=["2", 0], mode="add"),
              "6": n("ShowText", text=["5", 1])}
    ex.execute(prompt, "s1")
    second = ex.execute(prompt, "s2")
    assert second.outputs["4"]["text"] == ["add:3:1.5"] and second.outputs["6"]["text"] == ["add:3:1.5"]


def test_broken_classes_are_named_in_the_error():
    class NoFunction:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ()

    class BadInputs:
        FUNCTION = "f"

        @classmethod
        def INPUT_TYPES(cls):
            raise RuntimeError("boom")

        def f(self):
            return ()

    with pytest.raises(ClassicNodeError, match="NoFunction: FUNCTION"):
        nodedef_from_class("NoFunction", NoFunction)
    with pytest.raises(ClassicNodeError, match="BadInputs: INPUT_TYPES.*boom"):
        nodedef_from_class("BadInputs", BadInputs)
