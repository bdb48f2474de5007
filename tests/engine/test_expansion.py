"""Node expansion (a node returning a GraphBuilder sub-graph), ExecutionBlocker and rawLink inputs, run by
the executor with classic node classes over the toy nodes."""
from __future__ import annotations

from engine.cache import OutputCache
from engine.classic import nodedef_from_class
from engine.events import Event
from engine.executor import Executor
from engine.expansion import ExecutionBlocker, GraphBuilder
from engine.registry import Registry
from tests.engine import toy_nodes


class AddTwice:
    """Expands into Add(Add(a, b), b)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}), "b": ("INT", {"default": 1})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, a, b):
        graph = GraphBuilder()
        first = graph.node("Add", a=a, b=b)
        second = graph.node("Add", a=first.out(0), b=b)
        return {"result": (second.out(0),), "expand": graph}


class DeferToLink:
    """Takes its input as a raw link and expands into a Scale of the linked node's output."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"rawLink": True})}}
    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"

    def run(self, x):
        assert isinstance(x, list) and len(x) == 2   # the link itself, not its value
        graph = GraphBuilder()
        scaled = graph.node("Scale", x=x, factor=3.0)
        return {"result": (scaled.out(0),), "expand": graph.finalize()}


class Gate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True}), "open": ("BOOLEAN", {"default": False}),
                             "message": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, value, open, message):
        return (value if open else ExecutionBlocker(message or None),)


def registry() -> Registry:
    reg = Registry.from_nodes(toy_nodes)
    for cls in (AddTwice, DeferToLink, Gate):
        reg.add(nodedef_from_class(cls.__name__, cls))
    return reg


def run(prompt: dict) -> tuple:
    events: list[Event] = []
    ex = Executor(registry(), OutputCache({"cpu": 1 << 24}))
    return ex.execute(prompt, "p", emit=events.append), events


def test_expansion_runs_the_subgraph_and_reports_it_under_the_parent() -> None:
    result, events = run({"1": {"class_type": "Const", "inputs": {"value": 5}},
                          "2": {"class_type": "AddTwice", "inputs": {"a": ["1", 0], "b": 10}},
                          "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}})
    assert result.status == "success", result.error
    assert result.outputs["3"] == {"text": ["25"]}
    inner = [e.data for e in events if e.type == "executing" and str(e.data.get("node")).startswith("2.")]
    assert len(inner) == 2 and all(d["display_node"] == "2" for d in inner)
    assert len({d["node"] for d in inner}) == 2


def test_raw_link_expansion_reuses_a_node_of_the_prompt() -> None:
    result, _ = run({"1": {"class_type": "Const", "inputs": {"value": 4}},
                     "2": {"class_type": "DeferToLink", "inputs": {"x": ["1", 0]}},
                     "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}})
    assert result.status == "success", result.error
    assert result.outputs["3"] == {"text": ["12.0"]}


def test_invalid_expansion_fails_its_node_with_a_clear_error() -> None:
    result, _ = run({"1": {"class_type": "Const", "inputs": {"value": 4}},
                     "2": {"class_type": "AddTwice", "inputs": {"a": ["1", 0], "b": 10**10}},
                     "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}})
    assert result.status == "error"
    assert result.error["node_id"] == "2" and "node expansion is invalid" in result.error["exception_message"]


def test_execution_blocker_stops_downstream_and_output_nodes() -> None:
    adds = toy_nodes.calls_of("Add")
    result, _ = run({"1": {"class_type": "Const", "inputs": {"value": 4}},
                     "2": {"class_type": "Gate", "inputs": {"value": ["1", 0], "open": False, "message": ""}},
                     "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
                     "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
                     "5": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
    assert result.status == "success", result.error
    assert "4" not in result.outputs and result.outputs["5"] == {"text": ["4"]}
    assert toy_nodes.calls_of("Add") == adds      # the blocked node passed the blocker on without running
    result, _ = run({"1": {"class_type": "Const", "inputs": {"value": 4}},
                     "2": {"class_type": "Gate",
                           "inputs": {"value": ["1", 0], "open": False, "message": "gate closed"}},
                     "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}}})
    assert result.status == "error" and result.error["node_id"] == "4"
    assert "gate closed" in result.error["exception_message"]
