"""The saved shapes of one compat workflow (see data/make_front_end_variants.py) and what each must
convert to: UI schema 0.4, schema-1 (`_v1`), an older front end's save (`_old`), a SaveImage PNG."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from engine.png_metadata import load_workflow_file, read_png_text
from engine.ui_workflow import is_link, schema_inputs, ui_to_api, widget_default

VARIANTS = ("ui", "v1", "old", "png")
_GEN = Path(__file__).parent / "data" / "make_front_end_variants.py"
_spec = importlib.util.spec_from_file_location("make_front_end_variants", _GEN)
generator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generator)


def variant_path(folder: Path, name: str, variant: str) -> Path:
    return folder / {"ui": f"{name}.json", "v1": f"{name}_v1.json", "old": f"{name}_old.json",
                     "png": f"{name}.png"}[variant]


def core(prompt: dict) -> dict:
    """class_type and inputs per node: what the backend runs (titles are cosmetic)."""
    return {k: {"class_type": n["class_type"], "inputs": n["inputs"]} for k, n in prompt.items()}


def later_filled(api: dict, object_info: dict) -> tuple[dict, dict]:
    """(the API prompt as an older save converts: widgets added later at their schema default,
    {(node id, input): schema default} of those widgets)."""
    expected, filled = copy.deepcopy(api), {}
    for nid, node in expected.items():
        later = generator.LATER_WIDGETS.get(node["class_type"], ())
        specs = {s.name: s for s in schema_inputs(object_info[node["class_type"]])}
        for name in later:
            if name in specs and not is_link(node["inputs"].get(name)):
                filled[(nid, name)] = node["inputs"][name] = widget_default(specs[name])
    return expected, filled


def convert(folder: Path, name: str, variant: str, object_info: dict) -> tuple[dict, dict]:
    """(the UI document the variant loads as, its API prompt), through the path a dropped file takes."""
    path = variant_path(folder, name, variant)
    kind, doc = load_workflow_file(path)
    assert kind == "ui", (path, kind)
    if variant == "v1":
        assert doc["version"] == 1 and set(doc["state"]) == {"lastGroupId", "lastNodeId", "lastLinkId",
                                                             "lastRerouteId"}
        assert all(isinstance(link, dict) and {"origin_id", "target_slot"} <= set(link) for link in doc["links"])
    if variant == "old":
        assert "ds" not in doc.get("extra", {})
        assert not any("Node name for S&R" in n.get("properties", {}) for n in doc["nodes"])
    if variant == "png":
        chunks = read_png_text(path)
        api = json.loads((folder / f"{name}_api.json").read_text())
        assert json.loads(chunks["prompt"]) == api
        assert doc == json.loads(variant_path(folder, name, "ui").read_text())
    return doc, ui_to_api(doc, object_info)


def check_conversion(folder: Path, name: str, variant: str, object_info: dict) -> None:
    api = json.loads((folder / f"{name}_api.json").read_text())
    _, prompt = convert(folder, name, variant, object_info)
    if variant != "old":
        assert core(prompt) == core(api)
        return
    expected, filled = later_filled(api, object_info)
    assert core(prompt) == core(expected)
    for (nid, input_name), default in filled.items():
        assert prompt[nid]["inputs"][input_name] == default
    # the save really is older: no control_after_generate values, and fewer values where widgets came later
    ui = json.loads(variant_path(folder, name, "ui").read_text())
    old = json.loads(variant_path(folder, name, "old").read_text())
    controls = {"fixed", "increment", "decrement", "randomize"}
    assert not any(v in controls for n in old["nodes"] for v in n.get("widgets_values") or []
                   if isinstance(v, str))
    shorter = {n["type"] for n, o in zip(ui["nodes"], old["nodes"])
               if len(o.get("widgets_values") or []) < len(n.get("widgets_values") or [])}
    assert shorter == {n["type"] for n in ui["nodes"]
                       if any(v in controls for v in n.get("widgets_values") or [] if isinstance(v, str))
                       or any(k[0] == str(n["id"]) for k in filled)}


def check_committed_outputs(set_name: str, name: str, object_info: dict) -> None:
    """The committed variant files are what the generator writes today (it was rerun after any change)."""
    from engine.ui_workflow import api_to_ui

    folder = generator.DATA / set_name
    api = json.loads((folder / f"{name}_api.json").read_text())
    ui = json.loads((folder / f"{name}.json").read_text())
    if set_name == "sd3":
        assert ui == api_to_ui(api, object_info)
    assert json.loads((folder / f"{name}_v1.json").read_text()) == generator.to_v1(ui, f"{set_name}/{name}")
    assert json.loads((folder / f"{name}_old.json").read_text()) == generator.to_old(ui, object_info)
    chunks = read_png_text(folder / f"{name}.png")
    assert (chunks["prompt"], chunks["workflow"]) == (json.dumps(api), json.dumps(ui))
    # SaveImage's order: prompt first, then the extra_pnginfo keys
    raw = (folder / f"{name}.png").read_bytes()
    assert raw.index(b"tEXtprompt\x00") < raw.index(b"tEXtworkflow\x00") < raw.index(b"IDAT")
