"""Every example workflow in workflows/ runs headless on a tiny checkpoint and writes PNGs whose
metadata loads back to the same API prompt and UI workflow."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.executor import Executor
from engine.png_metadata import workflow_from_png
from engine.ui_workflow import ui_to_api

from .conftest import shrink

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = ["txt2img", "img2img", "inpainting", "hires_fix", "area_composition"]


@pytest.mark.parametrize("name", NAMES)
def test_example_workflow_runs_and_png_round_trips(sd_env, name):
    registry, config = sd_env
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    # The UI file is the same graph as the API file.
    assert ui_to_api(ui, registry.object_info()) == api

    prompt = shrink(copy.deepcopy(api))
    events = []
    result = Executor(registry).execute(prompt, f"wf-{name}", extra_data={"extra_pnginfo": {"workflow": ui}},
                                        emit=lambda e: events.append(e))
    assert result.status == "success", result.error
    kinds = [e.type for e in events]
    assert kinds[0] == "execution_start" and kinds[-2] == "execution_success"
    assert "progress" in kinds and "preview" in kinds

    saved = [img for out in result.outputs.values() for img in out["images"]]
    assert saved, "the workflow wrote no image"
    for img in saved:
        base = config.output_dir if img["type"] == "output" else config.temp_dir
        path = base / img["subfolder"] / img["filename"]
        assert path.is_file()
        workflow, loaded_prompt = workflow_from_png(path)
        assert loaded_prompt == prompt
        assert workflow == ui
        from PIL import Image
        with Image.open(path) as im:
            assert im.size[0] >= 64 and im.mode == "RGB"


def test_hires_fix_upscales_and_previews_first_pass(sd_env):
    registry, config = sd_env
    prompt = shrink(json.loads((WORKFLOWS / "hires_fix_api.json").read_text()))
    result = Executor(registry).execute(prompt, "hires")
    assert result.status == "success", result.error
    final = result.outputs["9"]["images"][0]
    preview = result.outputs["11"]["images"][0]
    from PIL import Image
    with (Image.open(config.output_dir / final["filename"]) as big,
          Image.open(config.temp_dir / preview["filename"]) as small):
        assert big.size == (96, 96) and small.size == (64, 64)
    assert preview["type"] == "temp" and preview["filename"].startswith("ComfyUI_temp_")
