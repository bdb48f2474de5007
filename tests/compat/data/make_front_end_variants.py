"""Write the shapes other front ends save for the sampling and SD3 compat workflows (rerunnable).

For every workflow `<name>` in `sampling/` and `sd3/` (the API file `<name>_api.json` is the truth):

- `<name>.json`: schema 0.4 UI, as `api_to_ui` writes it (made here for the SD3 set, which had API
  files only; the sampling set's UI files are kept as committed and used as the source);
- `<name>_v1.json`: the schema `version: 1` layout of ComfyUI_frontend's `workflowSchema.ts`: a
  `state` of id counters instead of `last_node_id`/`last_link_id`, links as objects;
- `<name>_old.json`: a schema 0.4 save from an older front end: no control_after_generate values (the
  seed widgets predate the control), without the trailing widgets in LATER_WIDGETS (inputs ComfyUI added
  to those nodes after they first shipped), no `extra.ds`, no `"Node name for S&R"` property;
- `<name>.png`: an 8x8 PNG with `prompt` (API) and `workflow` (UI) tEXt chunks, written the way
  SaveImage writes them (PIL PngInfo.add_text of json.dumps, compress_level 4).

Run: `PYTHONPATH=. python tests/compat/data/make_front_end_variants.py` from the repository root.
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
import uuid
from pathlib import Path

DATA = Path(__file__).parent
SETS = ("sampling", "sd3")

# Inputs that arrived after the node first shipped, so an older save lacks their (trailing) widget:
# BasicScheduler / SDTurboScheduler / AlignYourStepsScheduler gained `denoise`, DualCFGGuider its
# `style`, DifferentialDiffusion its `strength`, DualCLIPLoader its `device`.
LATER_WIDGETS: dict[str, tuple[str, ...]] = {
    "BasicScheduler": ("denoise",),
    "SDTurboScheduler": ("denoise",),
    "AlignYourStepsScheduler": ("denoise",),
    "DualCFGGuider": ("style",),
    "DifferentialDiffusion": ("strength",),
    "DualCLIPLoader": ("device",),
}


def workflow_names(set_name: str) -> list[str]:
    return sorted(p.name[: -len("_api.json")] for p in (DATA / set_name).glob("*_api.json"))


def to_v1(ui: dict, name: str) -> dict:
    """The same graph in the schema-1 layout (links as objects, id counters under `state`)."""
    links = [{"id": lid, "origin_id": oid, "origin_slot": oslot, "target_id": tid, "target_slot": tslot,
              "type": ltype} for lid, oid, oslot, tid, tslot, ltype in ui["links"]]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sdflow-compat/{name}")),
        "revision": 0,
        "version": 1,
        "config": {},
        "state": {"lastGroupId": 0, "lastNodeId": ui["last_node_id"], "lastLinkId": ui["last_link_id"],
                  "lastRerouteId": 0},
        "groups": ui.get("groups", []),
        "nodes": copy.deepcopy(ui["nodes"]),
        "links": links,
        "floatingLinks": [],
        "reroutes": [],
        "extra": copy.deepcopy(ui.get("extra", {})),
    }


def to_old(ui: dict, object_info: dict) -> dict:
    from engine.ui_workflow import _layout_entries

    old = copy.deepcopy(ui)
    old["extra"] = {}
    for node in old["nodes"]:
        node["properties"] = {k: v for k, v in node.get("properties", {}).items() if k != "Node name for S&R"}
        info = object_info.get(node["type"])
        values = node.get("widgets_values")
        if not info or not isinstance(values, list):
            continue
        entries = _layout_entries(info)
        assert len(entries) == len(values), (node["type"], entries, values)
        kept = [(entry, v) for entry, v in zip(entries, values) if entry[1] != "control"]
        later = LATER_WIDGETS.get(node["type"], ())
        while kept and kept[-1][0][0] in later:
            kept.pop()
        node["widgets_values"] = [v for _, v in kept]
    return old


def write_png(path: Path, prompt: dict, workflow: dict) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    Image.new("RGB", (8, 8), (90, 120, 200)).save(path, pnginfo=info, compress_level=4)


def dump(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def object_info() -> dict:
    import nodes
    from engine.config import RuntimeConfig

    config = RuntimeConfig(data_dir=Path(tempfile.mkdtemp(prefix="sdflow-variants-")))
    config.ensure_dirs()
    registry, _ = nodes.build_registry(config, plugins=False)
    return registry.object_info()


def main() -> None:
    from engine.ui_workflow import api_to_ui

    info = object_info()
    for set_name in SETS:
        for name in workflow_names(set_name):
            folder = DATA / set_name
            api = json.loads((folder / f"{name}_api.json").read_text())
            ui_path = folder / f"{name}.json"
            if set_name == "sd3":
                dump(ui_path, api_to_ui(api, info))
            ui = json.loads(ui_path.read_text())
            dump(folder / f"{name}_v1.json", to_v1(ui, f"{set_name}/{name}"))
            dump(folder / f"{name}_old.json", to_old(ui, info))
            write_png(folder / f"{name}.png", api, ui)
            print(f"{set_name}/{name}: ui, _v1, _old, png", file=sys.stderr)


if __name__ == "__main__":
    main()
