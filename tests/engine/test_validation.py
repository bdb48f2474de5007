"""Prompt validation: every ComfyUI error type, in the `node_errors` shape, all problems at once."""
import pytest

from engine.cache import OutputCache
from engine.executor import Executor
from engine.prompt import is_link, parse_node
from engine.registry import Registry
from engine.validation import validate_prompt
from tests.engine import toy_nodes as t


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.from_nodes(t)


def n(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def errors_of(vr, node_id: str) -> list[dict]:
    return vr.node_errors[node_id]["errors"]


def types_of(vr, node_id: str) -> list[str]:
    return [e["type"] for e in errors_of(vr, node_id)]


def assert_shape(vr) -> None:
    """Every node_errors entry has ComfyUI's keys, and every error its four keys."""
    for nid, entry in vr.node_errors.items():
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}, nid
        assert isinstance(entry["dependent_outputs"], list)
        assert entry["errors"]
        for err in entry["errors"]:
            assert set(err) == {"type", "message", "details", "extra_info"}, err
            assert isinstance(err["message"], str) and isinstance(err["details"], str)
            assert isinstance(err["extra_info"], dict)


def one_error(reg, prompt: dict, node_id: str, **kw) -> dict:
    vr = validate_prompt(prompt, reg, **kw)
    assert_shape(vr)
    assert vr.error is not None and vr.error["type"] == "prompt_outputs_failed_validation"
    assert vr.error["message"] == "Prompt outputs failed validation"
    assert list(vr.node_errors) == [node_id], vr.node_errors
    errs = errors_of(vr, node_id)
    assert len(errs) == 1, errs
    return errs[0]


# ---- a valid prompt ---------------------------------------------------------------------------------

def test_valid_prompt_resolves_and_orders(reg):
    p = {"1": n("Const", value="7"), "2": n("Add", a=["1", 0], b=2.0), "3": n("Show", value=["2", 0])}
    vr = validate_prompt(p, reg)
    assert vr.ok and vr.error is None and vr.node_errors == {}
    assert vr.outputs == ["3"]
    assert vr.order == ["1", "2", "3"]
    # Widget values are coerced to their declared types (ComfyUI writes the int() back).
    assert vr.nodes["1"].constants == {"value": 7} and type(vr.nodes["1"].constants["value"]) is int
    assert vr.nodes["2"].links == {"a": ("1", 0)}


def test_link_parsing_float_slot_and_value_wrapper(reg):
    p = {"1": n("Const", value=1), "2": n("Add", a=["1", 0.0], b=1), "4": n("Show", value=["2", 0])}
    vr = validate_prompt(p, reg)
    assert vr.ok, vr.node_errors
    assert vr.nodes["2"].links == {"a": ("1", 0)}
    # {"__value__": [...]} is a literal list, never a link; a bare 2-list [str, int] is a link.
    pn = parse_node("9", {"class_type": "X", "inputs": {"v": {"__value__": ["1", 0]}, "w": ["1", 0],
                                                         "x": [1, 0]}})
    assert pn.constants == {"v": ["1", 0]} and pn.links == {"w": ("1", 0)}
    assert pn.bad_links == {"x": [1, 0]}
    assert is_link(["1", 2.0]) and not is_link(["1", 0, 0]) and not is_link(("1", 0))


def test_unused_nodes_are_not_validated(reg):
    # Node 9 is broken but nothing that runs needs it (and it is not an output).
    p = {"1": n("Const", value=1), "2": n("Show", value=["1", 0]), "9": n("Const", value=99999)}
    vr = validate_prompt(p, reg)
    assert vr.ok and vr.node_errors == {} and set(vr.nodes) == {"1", "2"}


# ---- top-level errors ---------------------------------------------------------------------------------

def test_no_prompt(reg):
    for empty in ({}, None):
        vr = validate_prompt(empty, reg)
        assert vr.error["type"] == "no_prompt"
        assert vr.error["message"] == "No prompt provided"
        assert set(vr.error) == {"type", "message", "details", "extra_info"}
        assert vr.node_errors == {} and not vr.ok


def test_unknown_class_is_invalid_prompt_naming_the_node(reg):
    p = {"1": n("Const", value=1), "5": n("NoSuchNode", x=1), "2": n("Show", value=["1", 0])}
    vr = validate_prompt(p, reg)
    assert not vr.ok
    assert vr.error["type"] == "invalid_prompt"
    assert "NoSuchNode" in vr.error["message"] and "does not exist" in vr.error["message"]
    assert vr.error["details"] == "Node ID '#5'"
    assert set(vr.error) == {"type", "message", "details", "extra_info"}
    assert_shape(vr)
    assert list(vr.node_errors) == ["5"] and vr.node_errors["5"]["class_type"] == "NoSuchNode"


def test_missing_class_type_is_invalid_prompt(reg):
    p = {"1": {"inputs": {"value": 1}}, "2": n("Show", value=["1", 0])}
    vr = validate_prompt(p, reg)
    assert vr.error["type"] == "invalid_prompt"
    assert "class_type" in vr.error["message"]
    assert vr.error["details"] == "Node ID '#1'"


def test_prompt_no_outputs(reg):
    vr = validate_prompt({"1": n("Const", value=1), "2": n("Add", a=["1", 0], b=1)}, reg)
    assert vr.error["type"] == "prompt_no_outputs"
    assert vr.error["message"] == "Prompt has no outputs"
    assert vr.outputs == [] and not vr.ok


def test_partial_execution_targets_restrict_outputs(reg):
    p = {"1": n("Const", value=1), "2": n("Show", value=["1", 0]),
         "3": n("Const", value=2), "4": n("Show", value=["3", 0])}
    vr = validate_prompt(p, reg, partial_execution_targets=["4"])
    assert vr.ok and vr.outputs == ["4"] and set(vr.nodes) == {"3", "4"}
    # Targets that are not output nodes (or not in the prompt) leave nothing to run.
    vr = validate_prompt(p, reg, partial_execution_targets=["1", "77"])
    assert vr.error["type"] == "prompt_no_outputs"
    # A broken node outside the targets' sub-graph is not reported.
    p["3"]["inputs"]["value"] = 5000
    vr = validate_prompt(p, reg, partial_execution_targets=["2"])
    assert vr.ok and vr.node_errors == {}


# ---- per-input errors -------------------------------------------------------------------------------

def test_required_input_missing(reg):
    err = one_error(reg, {"1": n("Add", b=1), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "required_input_missing"
    assert err["message"] == "Required input is missing"
    assert err["details"] == "a"
    assert err["extra_info"]["input_name"] == "a"


def test_optional_input_may_be_absent(reg):
    vr = validate_prompt({"1": n("Pick", mode="b"), "2": n("Show", value=["1", 0])}, reg)
    assert vr.ok


def test_bad_linked_input_wrong_length_list(reg):
    err = one_error(reg, {"1": n("Const", value=1), "2": n("Add", a=["1", 0, 0], b=1),
                          "3": n("Show", value=["2", 0])}, "2")
    assert err["type"] == "bad_linked_input"
    assert err["extra_info"]["input_name"] == "a"
    assert err["extra_info"]["received_value"] in (repr(["1", 0, 0]), ["1", 0, 0])


def test_bad_linked_input_missing_node(reg):
    err = one_error(reg, {"2": n("Add", a=["42", 0], b=1), "3": n("Show", value=["2", 0])}, "2")
    assert err["type"] == "bad_linked_input"
    assert "42" in err["details"]
    assert err["extra_info"]["input_name"] == "a"


def test_bad_linked_input_missing_slot(reg):
    p = {"1": n("DivMod", a=7, b=2), "2": n("Add", a=["1", 5], b=1), "3": n("Show", value=["2", 0])}
    err = one_error(reg, p, "2")
    assert err["type"] == "bad_linked_input"
    assert "slot 5" in err["details"]
    # Slot 1 of the two-output node is fine.
    p["2"]["inputs"]["a"] = ["1", 1]
    assert validate_prompt(p, reg).ok


def test_return_type_mismatch(reg):
    p = {"1": n("Const", value=1), "2": n("InvertImage", image=["1", 0]), "3": n("Show", value=["2", 0])}
    err = one_error(reg, p, "2")
    assert err["type"] == "return_type_mismatch"
    assert err["message"] == "Return type mismatch between linked nodes"
    assert err["extra_info"]["input_name"] == "image"
    assert err["extra_info"]["received_type"] == "INT" and err["extra_info"]["input_type"] == "IMAGE"
    assert err["details"] == "image, received_type(INT) mismatch input_type(IMAGE)"


def test_union_and_any_types_link(reg):
    # INT into "INT,FLOAT" (union overlap), IMAGE into "*", STRING into a combo input.
    p = {"1": n("Const", value=2), "2": n("Scale", x=["1", 0], factor=1.5), "3": n("Show", value=["2", 0]),
         "4": n("SolidImage", value=0.5, size=2), "5": n("Show", value=["4", 0]),
         "6": n("Concat", a="-", b="", sep=" "), "7": n("Concat", a="a", b="b", sep=["6", 0]),
         "8": n("Show", value=["7", 0])}
    vr = validate_prompt(p, reg)
    assert vr.ok, vr.node_errors
    p["9"] = n("Scale", x=["6", 0], factor=1.0)          # STRING into INT,FLOAT
    p["10"] = n("Show", value=["9", 0])
    vr = validate_prompt(p, reg)
    assert types_of(vr, "9") == ["return_type_mismatch"]
    assert set(vr.outputs) == {"3", "5", "8"}


def test_invalid_input_type(reg):
    err = one_error(reg, {"1": n("Const", value="abc"), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "invalid_input_type"
    assert err["message"] == "Failed to convert an input value to a INT value"
    assert err["extra_info"]["input_name"] == "value" and err["extra_info"]["received_value"] == "abc"
    err = one_error(reg, {"1": n("SolidImage", value="much", size=2), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "invalid_input_type" and err["extra_info"]["input_name"] == "value"
    # A constant where only a link can go (a socket input) is also an invalid input type.
    err = one_error(reg, {"1": n("InvertImage", image=5), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "invalid_input_type" and err["extra_info"]["input_name"] == "image"


def test_value_smaller_than_min(reg):
    err = one_error(reg, {"1": n("Const", value=-1001), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "value_smaller_than_min"
    assert err["message"] == "Value -1001 smaller than min of -1000"
    assert err["extra_info"]["input_name"] == "value" and err["extra_info"]["received_value"] == -1001
    assert err["extra_info"]["input_config"] == ["INT", {"default": 0, "min": -1000, "max": 1000}]
    # The bounds themselves are allowed.
    assert validate_prompt({"1": n("Const", value=-1000), "2": n("Show", value=["1", 0])}, reg).ok


def test_value_bigger_than_max(reg):
    err = one_error(reg, {"1": n("SolidImage", value=1.5, size=2), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "value_bigger_than_max"
    assert err["message"] == "Value 1.5 bigger than max of 1.0"
    assert validate_prompt({"1": n("Const", value=1000), "2": n("Show", value=["1", 0])}, reg).ok


def test_value_not_in_list(reg):
    err = one_error(reg, {"1": n("Concat", a="x", b="y", sep="+"), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "value_not_in_list"
    assert err["message"] == "Value not in list"
    assert err["details"] == "sep: '+' not in [' ', '-', '']"
    assert err["extra_info"]["input_name"] == "sep" and err["extra_info"]["received_value"] == "+"


def test_value_not_in_dynamic_list_follows_current_choices(reg, monkeypatch):
    p = {"1": n("PickFile", name="new.safetensors"), "2": n("Show", value=["1", 0])}
    monkeypatch.setattr(t, "FILES", ["old.safetensors"])
    assert types_of(validate_prompt(p, reg), "1") == ["value_not_in_list"]
    monkeypatch.setattr(t, "FILES", ["old.safetensors", "new.safetensors"])
    assert validate_prompt(p, reg).ok


def test_long_combo_list_is_summarised(reg, monkeypatch):
    monkeypatch.setattr(t, "FILES", [f"f{i}" for i in range(30)])
    err = one_error(reg, {"1": n("PickFile", name="zzz"), "2": n("Show", value=["1", 0])}, "1")
    assert "(list of length 30)" in err["details"]


def test_custom_validation_failed(reg):
    err = one_error(reg, {"1": n("EvenOnly", value=3), "2": n("Show", value=["1", 0])}, "1")
    assert err["type"] == "custom_validation_failed"
    assert err["message"] == "Custom validation failed for node"
    assert "3 is odd" in err["details"]
    assert validate_prompt({"1": n("EvenOnly", value=4), "2": n("Show", value=["1", 0])}, reg).ok
    # A linked value is not known at validation time: the validator sees None and passes.
    p = {"0": n("Const", value=3), "1": n("EvenOnly", value=["0", 0]), "2": n("Show", value=["1", 0])}
    assert validate_prompt(p, reg).ok


def test_dependency_cycle(reg):
    p = {"1": n("Add", a=["2", 0], b=1), "2": n("Add", a=["1", 0], b=1), "3": n("Show", value=["2", 0])}
    vr = validate_prompt(p, reg)
    assert_shape(vr)
    assert not vr.ok and vr.error["type"] == "prompt_outputs_failed_validation"
    assert set(vr.node_errors) == {"1", "2"}          # the output is not blamed, only the cycle members
    for nid in ("1", "2"):
        err = errors_of(vr, nid)[0]
        assert err["type"] == "dependency_cycle" and err["message"] == "Dependency cycle detected"
        assert err["extra_info"]["cycle"] == ["1", "2"]
        assert vr.node_errors[nid]["dependent_outputs"] == ["3"]


def test_self_loop_is_a_cycle(reg):
    vr = validate_prompt({"1": n("Add", a=["1", 0], b=1), "2": n("Show", value=["1", 0])}, reg)
    assert types_of(vr, "1") == ["dependency_cycle"] and list(vr.node_errors) == ["1"]


# ---- every problem at once, and valid outputs still run ------------------------------------------------

def test_all_problems_reported_at_once(reg):
    p = {
        "1": n("Const", value=5000),                                   # above max
        "2": n("Concat", a="x", sep="?"),                              # b missing + sep not in list
        "3": n("InvertImage", image=["1", 0]),                         # type mismatch
        "4": n("Show", value=["3", 0]),
        "5": n("Show", value=["2", 0]),
        "6": n("EvenOnly", value=7),                                   # custom validation
        "7": n("Show", value=["6", 0]),
    }
    vr = validate_prompt(p, reg)
    assert_shape(vr)
    assert vr.error["type"] == "prompt_outputs_failed_validation"
    assert set(vr.node_errors) == {"1", "2", "3", "6"}
    assert types_of(vr, "1") == ["value_bigger_than_max"]
    assert sorted(types_of(vr, "2")) == ["required_input_missing", "value_not_in_list"]
    assert types_of(vr, "3") == ["return_type_mismatch"]
    assert types_of(vr, "6") == ["custom_validation_failed"]
    assert vr.node_errors["1"]["dependent_outputs"] == ["4"]
    assert vr.node_errors["2"]["dependent_outputs"] == ["5"]
    assert vr.node_errors["6"]["class_type"] == "EvenOnly"
    # The summary names every problem.
    for word in ("bigger than max", "Required input is missing", "Value not in list", "Return type mismatch",
                 "Custom validation failed"):
        assert word in vr.error["details"]


def test_downstream_of_an_error_is_not_listed(reg):
    p = {"1": n("Const", value=-5000), "2": n("Add", a=["1", 0], b=1), "3": n("Add", a=["2", 0], b=2),
         "4": n("Show", value=["3", 0])}
    vr = validate_prompt(p, reg)
    assert list(vr.node_errors) == ["1"]
    assert vr.node_errors["1"] == {"errors": vr.node_errors["1"]["errors"], "dependent_outputs": ["4"],
                                   "class_type": "Const"}


def test_shared_bad_node_lists_every_dependent_output(reg):
    p = {"1": n("Const", value="x"), "2": n("Show", value=["1", 0]), "3": n("Add", a=["1", 0], b=1),
         "4": n("Show", value=["3", 0])}
    vr = validate_prompt(p, reg)
    assert list(vr.node_errors) == ["1"]
    assert sorted(vr.node_errors["1"]["dependent_outputs"]) == ["2", "4"]


def test_valid_outputs_still_run_while_invalid_one_is_reported(reg):
    p = {"1": n("Const", value=3), "2": n("Add", a=["1", 0], b=4), "3": n("Show", value=["2", 0]),
         "4": n("Const", value=99999), "5": n("Show", value=["4", 0])}
    vr = validate_prompt(p, reg)
    assert vr.ok and vr.error is None
    assert vr.outputs == ["3"]
    assert set(vr.nodes) == {"1", "2", "3"}
    assert types_of(vr, "4") == ["value_bigger_than_max"]
    assert vr.node_errors["4"]["dependent_outputs"] == ["5"]

    t.CALLS.clear()
    ex = Executor(reg, OutputCache({"cpu": 1 << 26}))
    res = ex.execute(p, "p1")
    assert res.status == "success"
    assert res.executed == ["1", "2", "3"]
    assert res.outputs == {"3": {"text": ["7"]}}
    assert t.CALLS == ["Const", "Add", "Show"]


def test_executor_reports_validation_failure_as_execution_error(reg):
    events = []
    ex = Executor(reg, OutputCache({"cpu": 1 << 26}))
    res = ex.execute({"1": n("Const", value=5000), "2": n("Show", value=["1", 0])}, "bad",
                     emit=events.append)
    assert res.status == "error"
    assert [e.type for e in events] == ["execution_start", "execution_error", "executing"]
    data = events[1].data
    assert data["node_id"] == "1" and data["node_type"] == "Const"
    assert data["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
    assert events[2].data == {"node": None, "display_node": None, "prompt_id": "bad"}


def test_apply_overrides_by_id_and_title_without_touching_the_original():
    from engine.prompt import apply_overrides

    prompt = {"1": {"class_type": "Const", "inputs": {"value": 1}, "_meta": {"title": "Seed"}},
              "2": {"class_type": "Const", "inputs": {"value": 2}, "_meta": {"title": "Twin"}},
              "3": {"class_type": "Const", "inputs": {"value": 3}, "_meta": {"title": "Twin"}}}
    out = apply_overrides(prompt, {"Seed.value": 7, "3.value": 9})
    assert out["1"]["inputs"]["value"] == 7 and out["3"]["inputs"]["value"] == 9
    assert prompt["1"]["inputs"]["value"] == 1                        # the input prompt is unchanged
    with pytest.raises(ValueError, match="all of type 'Const'"):
        apply_overrides(prompt, {"Const.value": 4})                   # three nodes of that type
    single = {"9": {"class_type": "Add", "inputs": {"a": 1}}, **prompt}
    assert apply_overrides(single, {"Add.b": 2})["9"]["inputs"] == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="all titled 'Twin'"):
        apply_overrides(prompt, {"Twin.value": 0})
    with pytest.raises(ValueError, match="expected NODE.INPUT"):
        apply_overrides(prompt, {"value": 0})
