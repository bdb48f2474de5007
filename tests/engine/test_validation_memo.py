"""'Queue again' re-validates what depends on the world: a file deleted since the last run is caught."""
from engine.executor import Executor
from engine.registry import Registry
from tests.engine import toy_nodes as t


def test_identical_prompt_is_revalidated_when_a_choice_disappears():
    ex = Executor(Registry.from_nodes(t))
    prompt = {"1": {"class_type": "PickFile", "inputs": {"name": "a.safetensors"}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    old = list(t.FILES)
    try:
        assert ex.execute(prompt, "first").status == "success"
        t.FILES[:] = ["b.safetensors"]               # the file was deleted
        again = ex.execute(prompt, "again")
        assert again.status == "error"
        assert again.error["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
    finally:
        t.FILES[:] = old


def test_identical_prompt_with_a_custom_validator_is_revalidated(monkeypatch):
    ex = Executor(Registry.from_nodes(t))
    prompt = {"1": {"class_type": "EvenOnly", "inputs": {"value": 4}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    nd = t.even_only.__sdflow_node__ if hasattr(t, "even_only") else next(
        n for n in Registry.from_nodes(t) if n.name == "EvenOnly")
    assert ex.execute(prompt, "first").status == "success"
    monkeypatch.setattr(nd, "validate", lambda value: "the world changed")
    assert ex.execute(prompt, "again").status == "error"


def test_plain_prompts_are_still_memoized():
    ex = Executor(Registry.from_nodes(t))
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert ex.execute(prompt, "first").status == "success"
    first = ex._last_validation
    assert first is not None
    assert ex.execute(prompt, "again").status == "success"
    assert ex._last_validation is first
