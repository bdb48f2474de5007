"""Validation under hostile and careless input: every layer in one answer, bounded reports, null inputs,
"did you mean" suggestions, and overrides that name an input the node does not have."""
import json

import pytest

from engine.prompt import apply_overrides
from engine.registry import Registry
from engine.validation import MAX_CYCLE_MEMBERS, MAX_ERRORS_PER_NODE, MAX_NODE_ERRORS, validate_prompt
from tests.engine import toy_nodes as t


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.from_nodes(t)


def n(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def kinds(vr) -> set[tuple[str, str]]:
    return {(nid, e["type"]) for nid, entry in vr.node_errors.items() for e in entry["errors"]}


def test_unknown_class_type_mismatch_and_ranges_in_one_answer(reg):
    p = {
        "1": n("Cnst", value=1),                             # unknown class (a typo of Const)
        "2": n("Show", value=["1", 0]),
        "3": n("Const", value=5000),                         # above max
        "4": n("InvertImage", image=["3", 0]),               # INT into IMAGE
        "5": n("Show", value=["4", 0]),
        "6": n("Scale", x=["3", 0], factor=-1000.0),         # below min
        "7": n("Show", value=["6", 0]),
    }
    vr = validate_prompt(p, reg)
    assert not vr.ok and vr.error["type"] == "invalid_prompt"
    assert "Cnst" in vr.error["message"] and "did you mean Const" in vr.error["message"]
    assert kinds(vr) == {("1", "invalid_prompt"), ("3", "value_bigger_than_max"), ("4", "return_type_mismatch"),
                         ("6", "value_smaller_than_min")}
    assert vr.node_errors["1"]["dependent_outputs"] == ["2"]
    assert sorted(vr.node_errors["3"]["dependent_outputs"]) == ["5", "7"]


def test_unknown_class_alone_still_lists_outputs_it_breaks(reg):
    vr = validate_prompt({"1": n("NoSuchThing", x=1), "2": n("Show", value=["1", 0])}, reg)
    assert vr.error["type"] == "invalid_prompt" and list(vr.node_errors) == ["1"]
    assert vr.node_errors["1"]["dependent_outputs"] == ["2"]


@pytest.mark.parametrize("size", [3, 5000])
def test_cycle_reported_once_and_bounded(reg, size):
    p = {str(i): n("Add", a=[str((i + 1) % size), 0], b=1) for i in range(size)}
    p["out"] = n("Show", value=["0", 0])
    vr = validate_prompt(p, reg)
    assert not vr.ok and vr.error["type"] == "prompt_outputs_failed_validation"
    cycle_errors = [e for entry in vr.node_errors.values() for e in entry["errors"] if e["type"] == "dependency_cycle"]
    assert cycle_errors and all(e is cycle_errors[0] for e in cycle_errors)   # one error, shared
    info = cycle_errors[0]["extra_info"]
    assert info["cycle_size"] == size and len(info["cycle"]) == min(size, MAX_CYCLE_MEMBERS)
    assert vr.error["details"].count("Dependency cycle detected") == 1
    body = json.dumps({"error": vr.error, "node_errors": vr.node_errors})
    assert len(body) < 20_000, len(body)
    assert vr.node_errors["0"]["dependent_outputs"] == ["out"]


def test_many_bad_nodes_are_capped(reg):
    p = {str(i): n("Const", value=10**6) for i in range(3000)}
    p.update({f"s{i}": n("Show", value=[str(i), 0]) for i in range(3000)})
    vr = validate_prompt(p, reg)
    assert len(vr.node_errors) == MAX_NODE_ERRORS
    assert vr.error["extra_info"]["omitted_nodes"] == 3000 - MAX_NODE_ERRORS
    assert len(json.dumps(vr.node_errors)) < 200_000


def test_many_unknown_classes_are_capped(reg):
    p = {str(i): n(f"Unknown{i}", value=1) for i in range(5000)}
    p["s"] = n("Show", value=["0", 0])
    vr = validate_prompt(p, reg)
    assert vr.error["type"] == "invalid_prompt" and len(vr.node_errors) == MAX_NODE_ERRORS
    assert vr.error["extra_info"]["omitted_nodes"] == 5000 - MAX_NODE_ERRORS


def test_errors_per_node_and_long_values_are_capped(reg):
    inputs = {f"junk{i}": [1, 2, 3] for i in range(500)}           # 500 malformed links on one node
    inputs["text"] = "x" * 100_000
    vr = validate_prompt({"1": n("Upper", **inputs), "2": n("Show", value=["1", 0])}, reg)
    errors = vr.node_errors["1"]["errors"]
    assert len(errors) <= MAX_ERRORS_PER_NODE and errors[-1]["type"] == "too_many_errors"
    assert len(json.dumps(vr.node_errors)) < 20_000
    vr = validate_prompt({"1": n("Concat", a="x", b="", sep="y" * 100_000), "2": n("Show", value=["1", 0])}, reg)
    err = vr.node_errors["1"]["errors"][0]
    assert err["type"] == "value_not_in_list" and len(err["details"]) < 1000
    assert len(err["extra_info"]["received_value"]) < 300


@pytest.mark.parametrize("node, name", [
    (n("Upper", text=None), "text"),                 # a widget
    (n("InvertImage", image=None), "image"),         # a socket
    (n("Add", a=None, b=None), "a"),
])
def test_null_for_a_required_input_is_refused_up_front(reg, node, name):
    vr = validate_prompt({"1": node, "2": n("Show", value=["1", 0])}, reg)
    assert not vr.ok
    errs = [e for e in vr.node_errors["1"]["errors"] if e["extra_info"].get("input_name") == name]
    assert errs and errs[0]["type"] == "required_input_missing" and "null" in errs[0]["details"]


def test_null_for_an_optional_input_means_not_given(reg):
    vr = validate_prompt({"1": n("Pick", mode="a", image=None), "2": n("Show", value=["1", 0])}, reg)
    assert vr.ok, vr.node_errors


def test_misspelt_input_and_combo_value_get_suggestions(reg):
    vr = validate_prompt({"1": n("Concat", a="x", bb="y", sep="_"), "2": n("Show", value=["1", 0])}, reg)
    details = {e["type"]: e["details"] for e in vr.node_errors["1"]["errors"]}
    assert "did you mean b?" in details["required_input_missing"] and "'bb'" in details["required_input_missing"]
    vr = validate_prompt({"1": n("PickFile", name="a.safetensor"), "2": n("Show", value=["1", 0])}, reg)
    assert "did you mean 'a.safetensors'" in vr.node_errors["1"]["errors"][0]["details"]


def test_override_of_an_unknown_input_is_refused_with_suggestions(reg):
    prompt = {"3": n("Concat", a="x", b="y", sep=" ")}
    with pytest.raises(ValueError, match=r"node 3 \(Concat\) has no input 'sepp'; did you mean sep"):
        apply_overrides(prompt, {"3.sepp": "-"}, reg)
    with pytest.raises(ValueError, match="its inputs are a, b, sep"):
        apply_overrides(prompt, {"Concat.zzz": 1}, reg)
    assert apply_overrides(prompt, {"3.sep": "-"}, reg)["3"]["inputs"]["sep"] == "-"
    assert apply_overrides(prompt, {"3.sepp": "-"})["3"]["inputs"]["sepp"] == "-"   # no registry: no check
