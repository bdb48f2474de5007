"""UI-format <-> API-format conversion against hand-written ComfyUI documents in tests/engine/data."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.ui_workflow import (
    WorkflowFormatError,
    api_to_ui,
    is_api_prompt,
    is_link,
    is_ui_workflow,
    ui_to_api,
    unwrap_value,
    widget_layout,
)

DATA = Path(__file__).parent / "data"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def oi() -> dict:
    return load("object_info_core.json")


def strip_meta(prompt: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


def node_by_id(ui: dict, nid) -> dict:
    return next(n for n in ui["nodes"] if n["id"] == nid)


# Every UI fixture and the API prompt it must convert to, exactly (including _meta titles).
PAIRS = [
    ("default_ui.json", "default_api.json"),
    ("default_ui_v1.json", "default_api.json"),
    ("reroute_note_ui.json", "default_api.json"),
    ("muted_bypass_ui.json", "muted_bypass_api.json"),
    ("primitive_hires_ui.json", "primitive_hires_api.json"),
    ("inpaint_ui.json", "inpaint_api.json"),
    ("subgraph_ui.json", "subgraph_api.json"),
    ("group_node_ui.json", "group_node_api.json"),
]
API_FIXTURES = sorted({api for _, api in PAIRS})


# ---------------------------------------------------------------------------------------------- detection

def test_detection_of_both_formats():
    for ui, api in PAIRS:
        assert is_ui_workflow(load(ui)) and not is_api_prompt(load(ui))
        assert is_api_prompt(load(api)) and not is_ui_workflow(load(api))
    assert not is_api_prompt({})
    assert not is_api_prompt({"3": {"inputs": {}}})
    assert not is_api_prompt([{"class_type": "KSampler"}])
    assert not is_ui_workflow({"nodes": {}, "links": []})
    assert is_ui_workflow({"nodes": [], "version": 1})


def test_unwrap_and_link_helpers():
    assert unwrap_value({"__value__": [1, 2]}) == [1, 2]
    assert unwrap_value([1, 2]) == [1, 2]
    assert unwrap_value({"a": 1}) == {"a": 1}
    assert is_link(["4", 0]) and is_link(["4", 1.0])
    assert not is_link([4, 0]) and not is_link(["4", True]) and not is_link(["a", "b"]) and not is_link(["4", 0, 1])


def test_widget_layout_follows_frontend(oi):
    assert widget_layout(oi["KSampler"]) == ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert widget_layout(oi["LoadImage"]) == ["image", None]
    # the upload button is appended to `required`, so it comes after LoadImageMask's channel widget
    assert widget_layout(oi["LoadImageMask"]) == ["image", "channel", None]
    assert widget_layout(oi["SaveImage"]) == ["filename_prefix"]
    assert widget_layout(oi["VAEDecode"]) == []


# ---------------------------------------------------------------------------------------------- UI -> API

def test_default_graph_converts_exactly(oi):
    out = ui_to_api(load("default_ui.json"), oi)
    expected = load("default_api.json")
    assert strip_meta(out) == strip_meta(expected)
    assert out == expected
    # the old boolean control slot is skipped, not taken for `steps`
    assert out["3"]["inputs"]["seed"] == 156680208700286 and out["3"]["inputs"]["steps"] == 20
    assert out["3"]["_meta"] == {"title": "KSampler"}
    assert out["6"]["_meta"] == {"title": "CLIP Text Encode (Prompt)"}


@pytest.mark.parametrize("ui_name,api_name", PAIRS)
def test_fixture_converts_exactly(oi, ui_name, api_name):
    out = ui_to_api(load(ui_name), oi)
    assert out == load(api_name)
    assert all(isinstance(k, str) for k in out)
    json.dumps(out)  # plain JSON, ready to post


def test_v1_and_v04_schemas_agree(oi):
    assert ui_to_api(load("default_ui_v1.json"), oi) == ui_to_api(load("default_ui.json"), oi)


def test_muted_nodes_are_left_out_and_their_links_dropped(oi):
    out = ui_to_api(load("muted_bypass_ui.json"), oi)
    assert "13" not in out and "15" not in out  # the muted PreviewImage and VAELoader
    assert out["16"]["inputs"] == {"samples": ["3", 0]}  # its vae came from the muted loader


def test_bypassed_nodes_are_bridged_by_type(oi):
    out = ui_to_api(load("muted_bypass_ui.json"), oi)
    for bypassed in ("10", "11", "12", "17"):
        assert bypassed not in out
    assert out["3"]["inputs"]["model"] == ["4", 0]  # through the bypassed LoRA: MODEL -> model input
    assert out["6"]["inputs"]["clip"] == ["4", 1] and out["7"]["inputs"]["clip"] == ["4", 1]
    assert out["8"]["inputs"]["samples"] == ["3", 0]  # through two bypassed LatentUpscale nodes
    assert out["18"]["inputs"]["images"] == ["16", 0]  # through a bypassed ImageScale


def test_bypassed_node_without_a_matching_input_drops_the_link(oi):
    ui = load("muted_bypass_ui.json")
    node_by_id(ui, 15)["mode"] = 4  # the VAELoader has no VAE input to pass through
    out = ui_to_api(ui, oi)
    assert "15" not in out and "vae" not in out["16"]["inputs"]


def test_bypass_prefers_the_input_at_the_same_index(oi):
    # positive and negative both go through a bypassed Apply ControlNet: output 1 (negative) must map
    # to input 1 (negative), not to the first CONDITIONING input.
    ui = load("default_ui.json")
    ui["nodes"].append({
        "id": 20, "type": "ControlNetApplyAdvanced", "mode": 4, "order": 4,
        "inputs": [{"name": "positive", "type": "CONDITIONING", "link": 20},
                   {"name": "negative", "type": "CONDITIONING", "link": 21},
                   {"name": "control_net", "type": "CONTROL_NET", "link": None},
                   {"name": "image", "type": "IMAGE", "link": None},
                   {"name": "vae", "type": "VAE", "link": None}],
        "outputs": [{"name": "positive", "type": "CONDITIONING", "links": [4]},
                    {"name": "negative", "type": "CONDITIONING", "links": [6]}],
        "widgets_values": [0.8, 0, 1]})
    links = {link[0]: link for link in ui["links"]}
    links[4] = [4, 20, 0, 3, 1, "CONDITIONING"]
    links[6] = [6, 20, 1, 3, 2, "CONDITIONING"]
    links[20] = [20, 6, 0, 20, 0, "CONDITIONING"]
    links[21] = [21, 7, 0, 20, 1, "CONDITIONING"]
    ui["links"] = list(links.values())
    out = ui_to_api(ui, oi)
    assert "20" not in out
    assert out["3"]["inputs"]["positive"] == ["6", 0]
    assert out["3"]["inputs"]["negative"] == ["7", 0]


def test_reroute_chain_and_notes_vanish(oi):
    out = ui_to_api(load("reroute_note_ui.json"), oi)
    assert set(out) == {"3", "4", "5", "6", "7", "8", "9"}  # no Reroute, Note or MarkdownNote
    assert out["6"]["inputs"]["clip"] == ["4", 1]  # two reroutes deep
    assert out["8"]["inputs"]["vae"] == ["4", 2]


def test_reroute_loop_is_an_error(oi):
    ui = load("reroute_note_ui.json")
    for link in ui["links"]:
        if link[0] == 10:
            link[1], link[2] = 11, 0  # reroute 10 now feeds from reroute 11, which feeds from 10
    with pytest.raises(WorkflowFormatError, match="loop"):
        ui_to_api(ui, oi)


def test_primitive_node_feeds_constants(oi):
    out = ui_to_api(load("primitive_hires_ui.json"), oi)
    assert "20" not in out and "22" not in out  # PrimitiveNode never reaches the backend
    assert out["3"]["inputs"]["seed"] == 8675309 and out["11"]["inputs"]["seed"] == 8675309
    assert out["5"]["inputs"]["width"] == 640  # not the stale 512 left in EmptyLatentImage's widgets
    assert out["11"]["inputs"]["steps"] == ["21", 0]  # converted widget linked to a real node
    assert out["11"]["inputs"]["cfg"] == 7  # widget input with no link keeps its value
    assert out["21"]["inputs"] == {"value": 12}  # a backend primitive is a real node


def test_converted_widget_falls_back_to_its_value_when_source_is_muted(oi):
    ui = load("primitive_hires_ui.json")
    node_by_id(ui, 21)["mode"] = 2
    out = ui_to_api(ui, oi)
    assert "21" not in out and out["11"]["inputs"]["steps"] == 20


def test_older_frontend_widget_layouts(oi):
    ui = load("inpaint_ui.json")
    node_by_id(ui, 10)["widgets_values"] = ["example.png"]  # no upload slot
    node_by_id(ui, 3)["widgets_values"] = [1234, 30, 6.5, "dpmpp_2m_sde", "karras", 0.75]  # no control slot
    out = ui_to_api(ui, oi)
    assert out == load("inpaint_api.json")


def test_dict_widgets_values_and_list_wrapping(oi):
    ui = load("default_ui.json")
    node_by_id(ui, 3)["widgets_values"] = {"seed": 5, "steps": 12, "cfg": 4.5, "sampler_name": "lcm",
                                           "scheduler": "simple", "denoise": 1, "control_after_generate": "fixed"}
    ui["nodes"].append({"id": 30, "type": "ImpactWildcardTagger", "mode": 0,
                        "inputs": [{"name": "image", "type": "IMAGE", "link": 30}],
                        "outputs": [{"name": "STRING", "type": "STRING", "links": []}],
                        "widgets_values": {"tags": ["castle", "moat"], "threshold": 0.35}})
    ui["links"].append([30, 8, 0, 30, 0, "IMAGE"])
    out = ui_to_api(ui, oi)
    assert out["3"]["inputs"] == {"seed": 5, "steps": 12, "cfg": 4.5, "sampler_name": "lcm", "scheduler": "simple",
                                  "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                  "latent_image": ["5", 0], "denoise": 1}
    # an unknown node is still emitted, for validation to report by name
    assert out["30"] == {"inputs": {"tags": {"__value__": ["castle", "moat"]}, "threshold": 0.35, "image": ["8", 0]},
                         "class_type": "ImpactWildcardTagger", "_meta": {"title": "ImpactWildcardTagger"}}


def test_unknown_node_with_widget_input_slots(oi):
    ui = load("default_ui.json")
    ui["nodes"].append({"id": 31, "type": "SomeCustomNode", "mode": 0,
                        "inputs": [{"name": "image", "type": "IMAGE", "link": None},
                                   {"name": "mode", "type": "COMBO", "widget": {"name": "mode"}, "link": None},
                                   {"name": "amount", "type": "FLOAT", "widget": {"name": "amount"}, "link": None}],
                        "widgets_values": ["soft", 0.25]})
    ui["nodes"].append({"id": 32, "type": "OtherCustomNode", "mode": 0, "inputs": [], "widgets_values": [1, 2, 3]})
    out = ui_to_api(ui, oi)
    assert out["31"]["inputs"] == {"mode": "soft", "amount": 0.25}
    assert out["32"] == {"inputs": {}, "class_type": "OtherCustomNode", "_meta": {"title": "OtherCustomNode"}}


def test_set_and_get_nodes_are_resolved(oi):
    ui = load("default_ui.json")
    ui["nodes"] += [
        {"id": 40, "type": "SetNode", "mode": 0, "inputs": [{"name": "VAE", "type": "VAE", "link": 40}],
         "outputs": [], "widgets_values": ["vae"]},
        {"id": 41, "type": "GetNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "VAE", "type": "VAE", "links": [8]}], "widgets_values": ["vae"]},
    ]
    ui["links"] = [link for link in ui["links"] if link[0] != 8] + [[40, 4, 2, 40, 0, "VAE"], [8, 41, 0, 8, 1, "VAE"]]
    assert ui_to_api(ui, oi) == load("default_api.json")


def test_subgraph_flattening(oi):
    out = ui_to_api(load("subgraph_ui.json"), oi)
    assert "10" not in out
    assert out["10:1"]["inputs"]["seed"] == 777  # promoted widget value from the instance
    assert out["10:2"]["inputs"]["samples"] == ["10:1", 0]
    assert out["9"]["inputs"]["images"] == ["10:2", 0]


def test_muted_subgraph_instance_hides_its_nodes(oi):
    ui = load("subgraph_ui.json")
    node_by_id(ui, 10)["mode"] = 2
    out = ui_to_api(ui, oi)
    assert not any(":" in k for k in out) and out["9"]["inputs"] == {"filename_prefix": "subgraph"}


def test_subgraph_containing_itself_is_an_error(oi):
    ui = load("subgraph_ui.json")
    sg = ui["definitions"]["subgraphs"][0]
    sg["nodes"].append({"id": 3, "type": sg["id"], "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowFormatError, match="contains itself"):
        ui_to_api(ui, oi)


def test_legacy_group_node_is_flattened_like_the_frontend(oi):
    out = ui_to_api(load("group_node_ui.json"), oi)
    assert "10" not in out
    # instance widgets go to the inner nodes in order; the second "text" was named "CLIPTextEncode text"
    assert out["10:0"]["inputs"]["text"].startswith("beautiful scenery")
    assert out["10:1"]["inputs"] == {"text": "text, watermark", "clip": ["4", 1]}
    assert out["10:2"]["inputs"]["seed"] == 156680208700286
    assert out["10:2"]["inputs"]["positive"] == ["10:0", 0]
    assert out["9"]["inputs"]["images"] == ["10:3", 0]


def test_legacy_group_node_older_prefix_and_no_instance_values(oi):
    ui = load("group_node_ui.json")
    inst = node_by_id(ui, 10)
    inst["type"] = "workflow/Prompts+Sampler"  # the 2023 frontend's separator
    del inst["widgets_values"]
    out = ui_to_api(ui, oi)
    # without instance values the inner nodes keep the ones saved in the definition
    assert out["10:0"]["inputs"]["text"] == "a cat" and out["10:2"]["inputs"]["seed"] == 1
    assert out["9"]["inputs"]["images"] == ["10:3", 0]


def test_legacy_group_node_muted_or_bypassed(oi):
    ui = load("group_node_ui.json")
    node_by_id(ui, 10)["mode"] = 2
    out = ui_to_api(ui, oi)
    assert not any(k.startswith("10:") for k in out) and "images" not in out["9"]["inputs"]


def test_legacy_group_node_with_primitive_and_converted_seed(oi):
    ui = load("group_node_ui.json")
    group = ui["extra"]["groupNodes"]["Prompts+Sampler"]
    ks = group["nodes"][2]
    ks["inputs"].append({"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}})
    group["nodes"].insert(0, {"type": "PrimitiveNode", "pos": [0, 0], "size": [210, 82], "flags": {}, "order": 0,
                              "mode": 0, "inputs": [],
                              "outputs": [{"name": "INT", "type": "INT", "links": [], "widget": {"name": "seed"}}],
                              "title": "Seed", "properties": {"Run widget replace on values": False},
                              "widgets_values": [5, "fixed"], "index": 0})
    # every index moves by one; the primitive feeds the KSampler's converted seed (its slot 4)
    group["links"] = [[a + 1, b, c + 1, d, *rest] for a, b, c, d, *rest in group["links"]]
    group["links"].append([0, 0, 3, 4, 9, "INT"])
    group["external"] = [[4, 0, "IMAGE"]]
    inst = node_by_id(ui, 10)
    # widgets: Seed value + control, both texts, then the KSampler's remaining widgets
    inst["widgets_values"] = [4242, "fixed", "a dog", "blurry", 25, 7.5, "euler", "karras", 0.9]
    out = ui_to_api(ui, oi)
    assert out["10:3"]["inputs"]["seed"] == 4242 and out["10:3"]["inputs"]["steps"] == 25
    assert out["10:1"]["inputs"]["text"] == "a dog" and out["10:2"]["inputs"]["text"] == "blurry"
    assert out["10:3"]["inputs"]["scheduler"] == "karras" and out["9"]["inputs"]["images"] == ["10:4", 0]
    assert "10:0" not in out  # the primitive is frontend-only


def test_legacy_group_widget_turned_into_an_instance_input(oi):
    ui = load("group_node_ui.json")
    inst = node_by_id(ui, 10)
    inst["inputs"].append({"name": "seed", "type": "INT", "link": 20, "widget": {"name": "seed"}})
    ui["nodes"].append({"id": 21, "type": "PrimitiveInt", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [20]}], "widgets_values": [99, "fixed"]})
    ui["links"].append([20, 21, 0, 10, 5, "INT"])
    out = ui_to_api(ui, oi)
    assert out["10:2"]["inputs"]["seed"] == ["21", 0]


def test_legacy_group_node_with_an_unknown_inner_type_reaches_validation(oi):
    ui = load("group_node_ui.json")
    ui["extra"]["groupNodes"]["Prompts+Sampler"]["nodes"][3]["type"] = "FancyDecode"
    out = ui_to_api(ui, oi)
    assert out["10:3"]["class_type"] == "FancyDecode"
    assert out["10:3"]["inputs"] == {"samples": ["10:2", 0], "vae": ["4", 2]}


def test_malformed_legacy_group_is_named(oi):
    ui = load("group_node_ui.json")
    ui["extra"]["groupNodes"]["Prompts+Sampler"]["nodes"] = [{"pos": [0, 0]}]
    with pytest.raises(WorkflowFormatError, match=r"node 10 .*group node 'Prompts\+Sampler'"):
        ui_to_api(ui, oi)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda ui: ui.__setitem__("nodes", {}), "not a UI workflow"),
    (lambda ui: ui["nodes"].append({"id": 60}), r"node 60 .*no 'type'"),
    (lambda ui: ui["nodes"].append(copy.deepcopy(ui["nodes"][0])), "duplicate node id '7'"),
    (lambda ui: ui["links"].append([99, 4]), "malformed link"),
    (lambda ui: ui["nodes"][0].__setitem__("widgets_values", "oops"), r"node 7 \('CLIPTextEncode'\).*widgets_values"),
    (lambda ui: ui["nodes"][0].__setitem__("inputs", [None]), r"node 7 \('CLIPTextEncode'\).*slot"),
])
def test_malformed_documents_name_what_is_wrong(oi, mutate, pattern):
    ui = load("default_ui.json")
    mutate(ui)
    with pytest.raises(WorkflowFormatError, match=pattern):
        ui_to_api(ui, oi)


def test_not_a_workflow():
    with pytest.raises(WorkflowFormatError):
        ui_to_api(load("default_api.json"), {})
    with pytest.raises(WorkflowFormatError):
        ui_to_api([], {})


# ---------------------------------------------------------------------------------------------- API -> UI

@pytest.mark.parametrize("api_name", API_FIXTURES)
def test_api_to_ui_round_trips(oi, api_name):
    prompt = load(api_name)
    ui = api_to_ui(prompt, oi)
    assert is_ui_workflow(ui) and ui["version"] == 0.4
    ui = json.loads(json.dumps(ui))  # survives being saved
    assert ui_to_api(ui, oi) == prompt


@pytest.mark.parametrize("ui_name", [ui for ui, _ in PAIRS])
def test_ui_fixture_round_trips_through_api(oi, ui_name):
    prompt = ui_to_api(load(ui_name), oi)
    assert ui_to_api(api_to_ui(prompt, oi), oi) == prompt


def test_api_to_ui_builds_a_consistent_litegraph_document(oi):
    ui = api_to_ui(load("default_api.json"), oi)
    ids = {n["id"] for n in ui["nodes"]}
    assert ids == {3, 4, 5, 6, 7, 8, 9}
    assert ui["last_node_id"] == 9 and ui["last_link_id"] == len(ui["links"]) == 9
    for link_id, origin, oslot, target, tslot, ltype in ui["links"]:
        src, dst = node_by_id(ui, origin), node_by_id(ui, target)
        assert link_id in src["outputs"][oslot]["links"]
        assert dst["inputs"][tslot]["link"] == link_id
        assert src["outputs"][oslot]["type"] == ltype
    ks = node_by_id(ui, 3)
    assert ks["widgets_values"] == [156680208700286, "fixed", 20, 8, "euler", "normal", 1]
    assert [s["name"] for s in ks["inputs"]] == ["model", "positive", "negative", "latent_image"]
    assert "title" not in ks  # default titles are not stored
    assert node_by_id(ui, 4)["pos"][0] < ks["pos"][0] < node_by_id(ui, 9)["pos"][0]  # columns by depth
    inpaint = api_to_ui(load("inpaint_api.json"), oi)
    assert node_by_id(inpaint, 10)["widgets_values"] == ["example.png", "image"]
    assert node_by_id(inpaint, 13)["widgets_values"] == ["input_photo.jpg", "red", "image"]


def test_api_to_ui_keeps_titles_links_to_widgets_and_string_ids(oi):
    hires = api_to_ui(load("primitive_hires_api.json"), oi)
    ks = node_by_id(hires, 11)
    assert ks["title"] == "KSampler (hires pass)"
    steps = next(s for s in ks["inputs"] if s["name"] == "steps")
    assert steps["widget"] == {"name": "steps"} and steps["link"] is not None
    sub = api_to_ui(load("subgraph_api.json"), oi)
    assert {"10:1", "10:2"} <= {n["id"] for n in sub["nodes"]}


def test_api_to_ui_preserves_unset_widgets_and_unknown_nodes(oi):
    prompt = {
        "1": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 4, "cfg": 1.5, "sampler_name": "euler",
                                                   "scheduler": "simple", "model": ["2", 0]}},
        "2": {"class_type": "MysteryModelLoader", "inputs": {"names": {"__value__": ["a", "b"]}, "scale": 2}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x", "stray": 1}},
    }
    ui = api_to_ui(prompt, oi)
    assert node_by_id(ui, 1)["widgets_values"][-1] is None  # denoise was not set
    assert node_by_id(ui, 2)["widgets_values"] == {"names": ["a", "b"], "scale": 2}
    assert node_by_id(ui, 3)["widgets_values"] == {"filename_prefix": "x", "stray": 1}
    assert strip_meta(ui_to_api(ui, oi)) == prompt


def test_api_to_ui_rejects_non_prompts(oi):
    with pytest.raises(WorkflowFormatError):
        api_to_ui(load("default_ui.json"), oi)
    with pytest.raises(WorkflowFormatError, match="node '3'"):
        api_to_ui({"3": {"class_type": "KSampler", "inputs": []}}, oi)


# ---------------------------------------------------------------------------------------------- widget defaults

# ComfyUI's VAEEncodeForInpaint schema (nodes.py): grow_mask_by was added after the first inpaint saves.
VAE_ENCODE_FOR_INPAINT = {
    "input": {"required": {"pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"],
                           "grow_mask_by": ["INT", {"default": 6, "min": 0, "max": 64, "step": 1}]}},
    "input_order": {"required": ["pixels", "vae", "mask", "grow_mask_by"]},
    "output": ["LATENT"], "output_name": ["LATENT"], "name": "VAEEncodeForInpaint",
    "display_name": "VAE Encode (for Inpainting)", "category": "latent/inpaint",
}


def test_node_saved_without_widgets_values_gets_schema_defaults(oi):
    ui = load("default_ui.json")
    del node_by_id(ui, 9)["widgets_values"]  # SaveImage as hand-edited / stripped files carry it
    out = ui_to_api(ui, oi)
    assert out["9"]["inputs"] == {"images": ["8", 0], "filename_prefix": "ComfyUI"}


def test_older_save_with_fewer_widgets_gets_the_missing_defaults(oi):
    ui = load("inpaint_ui.json")
    info = dict(oi, VAEEncodeForInpaint=VAE_ENCODE_FOR_INPAINT)
    enc = node_by_id(ui, 11)
    enc["type"] = "VAEEncodeForInpaint"
    enc["inputs"].append({"name": "mask", "type": "MASK", "link": None})
    enc["widgets_values"] = []  # saved before grow_mask_by existed
    assert ui_to_api(ui, info)["11"]["inputs"]["grow_mask_by"] == 6
    # a KSampler saved before denoise existed: the seed's control slot is kept, denoise defaults
    node_by_id(ui, 3)["widgets_values"] = [1234, "increment", 30, 6.5, "dpmpp_2m_sde", "karras"]
    ks = ui_to_api(ui, info)["3"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["scheduler"], ks["denoise"]) == (1234, 30, "karras", 1.0)


def test_explicit_null_widget_is_not_replaced_by_a_default(oi):
    ui = load("default_ui.json")
    node_by_id(ui, 9)["widgets_values"] = [None]
    assert "filename_prefix" not in ui_to_api(ui, oi)["9"]["inputs"]


def test_widget_default_without_a_default_option():
    from engine.ui_workflow import InputSpec, widget_default
    assert widget_default(InputSpec("n", "INT", {"min": 3}, True)) == 3
    assert widget_default(InputSpec("f", "FLOAT", {"max": -1.0}, True)) == -1.0
    assert widget_default(InputSpec("c", ["a", "b"], {}, True)) == "a"
    assert widget_default(InputSpec("s", "STRING", {}, True)) == ""
    assert widget_default(InputSpec("b", "BOOLEAN", {}, True)) is False


def test_damaged_legacy_group_definitions_fail_cleanly(oi):
    """Every single-field corruption of the definition converts or fails with WorkflowFormatError."""
    base = load("group_node_ui.json")
    group = base["extra"]["groupNodes"]["Prompts+Sampler"]
    paths = [("links",), ("external",), ("nodes", 0, "inputs"), ("nodes", 2, "widgets_values"),
             ("nodes", 3, "outputs"), ("links", 0), ("external", 0), ("nodes", 1, "inputs", 0)]
    for path in paths:
        for bad in (None, 7, "x", [None], [[None, None, None, None]], {"a": 1}, [["a", 0, "b", 1]]):
            ui = copy.deepcopy(base)
            target = ui["extra"]["groupNodes"]["Prompts+Sampler"]
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = bad
            try:
                ui_to_api(ui, oi)
            except WorkflowFormatError:
                pass
    assert group["external"] == [[3, 0, "IMAGE"]]  # the fixture itself was not touched
