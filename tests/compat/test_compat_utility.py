"""Community-shaped workflows for the graph-format fixes and the utility nodes, run end to end on the
tiny SD1 checkpoint: UI files as the current and older frontends save them (widgets missing, legacy group
nodes), API prompts, and PNGs carrying `prompt`/`workflow` chunks as SaveImage writes them."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from engine.executor import Executor
from engine.png_metadata import load_workflow_file, read_png_text
from engine.ui_workflow import ui_to_api
from engine.validation import validate_prompt
from tests.nodes import conftest as nodes_conftest
from tests.nodes.conftest import shrink

# The SD fixtures, bound as module attributes so pytest collects them here.
_sd_runtime_for_test = nodes_conftest._sd_runtime_for_test
sd_env = nodes_conftest.sd_env

DATA = Path(__file__).parent / "data" / "utility"


def to_prompt(name: str, registry) -> dict:
    kind, doc = load_workflow_file(DATA / name)
    return ui_to_api(doc, registry.object_info()) if kind == "ui" else doc


def run(prompt: dict, sd_env, name: str) -> dict:
    """Validate and execute; the outputs (ui dicts by node id) of a successful run."""
    registry, config = sd_env
    vr = validate_prompt(prompt, registry)
    assert vr.ok, (vr.error, vr.node_errors)
    result = Executor(registry, config=config).execute(prompt, name)
    assert result.status == "success", result.error
    return result.outputs


def saved(sd_env, outputs: dict, node_id: str) -> list[Image.Image]:
    _, config = sd_env
    files = outputs[node_id]["images"]
    assert files, outputs
    return [Image.open(config.output_dir / f["subfolder"] / f["filename"]) for f in files]


def test_default_graph_saved_without_widgets_values_runs(sd_env):
    registry, _ = sd_env
    prompt = to_prompt("default_graph_no_widgets_ui.json", registry)
    assert prompt["9"]["inputs"]["filename_prefix"] == "ComfyUI"  # SaveImage's schema default
    outputs = run(shrink(prompt), sd_env, "default-no-widgets")
    images = saved(sd_env, outputs, "9")
    assert images[0].size == (64, 64) and outputs["9"]["images"][0]["filename"].startswith("ComfyUI_")


def test_inpaint_saved_by_a_2023_frontend_runs(sd_env):
    registry, _ = sd_env
    prompt = to_prompt("inpaint_2023_ui.json", registry)
    enc = next(n for n in prompt.values() if n["class_type"] == "VAEEncodeForInpaint")
    assert enc["inputs"]["grow_mask_by"] == 6  # missing from the save: the schema default
    ks = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert (ks["inputs"]["seed"], ks["inputs"]["steps"], ks["inputs"]["denoise"]) == (5, 20, 1)
    outputs = run(shrink(prompt), sd_env, "inpaint-2023")
    assert saved(sd_env, outputs, "9")[0].size == (64, 64)


@pytest.mark.parametrize("prefix", ["workflow>", "workflow/"])  # the 2024 and the 2023 frontend's type names
def test_legacy_group_node_workflow_runs(sd_env, prefix):
    registry, _ = sd_env
    _, doc = load_workflow_file(DATA / "group_node_ui.json")
    for node in doc["nodes"]:
        if node["type"].startswith("workflow"):
            node["type"] = prefix + node["type"].split(">", 1)[1]
    prompt = ui_to_api(doc, registry.object_info())
    assert {"10:0", "10:1", "10:2", "10:3"} <= set(prompt) and "10" not in prompt
    outputs = run(shrink(prompt), sd_env, "group-node")
    assert saved(sd_env, outputs, "9")[0].size == (64, 64)


def test_latent_nodes_workflow(sd_env):
    registry, _ = sd_env
    outputs = run(shrink(to_prompt("latent_ops_api.json", registry)), sd_env, "latent-ops")
    images = saved(sd_env, outputs, "9")
    # LatentFromBatch(1) -> RepeatLatentBatch(2) ... -> LatentBatch with the 2 sampled latents: 4 images
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)


def test_outpaint_workflow_with_image_and_mask_nodes(sd_env):
    registry, _ = sd_env
    outputs = run(shrink(to_prompt("outpaint_api.json", registry)), sd_env, "outpaint")
    image = saved(sd_env, outputs, "9")[0]
    assert image.size == (96, 64)  # 64 px wide input padded 32 px to the right
    source = Image.open(sd_env[1].input_dir / "example.png").convert("RGB")
    # ImageCompositeMasked put the original pixels back where the pad mask is 0
    assert image.convert("RGB").getpixel((5, 5)) == source.getpixel((5, 5))


def test_masked_conditioning_strings_and_primitives_ui_workflow(sd_env):
    registry, _ = sd_env
    prompt = to_prompt("masked_conditioning_ui.json", registry)
    ks = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert ks["inputs"]["seed"][1] == 0 and prompt[ks["inputs"]["seed"][0]]["class_type"] == "PrimitiveInt"
    outputs = run(shrink(prompt), sd_env, "masked-cond")
    assert saved(sd_env, outputs, "9")[0].size == (64, 64)
    preview = outputs["53"]["images"][0]
    assert preview["type"] == "temp" and preview["filename"].endswith(".png")


@pytest.mark.parametrize("name", ["image_ops.png", "image_ops_prompt_only.png"])
def test_image_nodes_workflow_from_png(sd_env, name):
    registry, _ = sd_env
    chunks = read_png_text(DATA / name)
    assert "prompt" in chunks and (("workflow" in chunks) == (name == "image_ops.png"))
    prompt = to_prompt(name, registry)
    outputs = run(shrink(prompt), sd_env, "image-ops-" + name)
    image = saved(sd_env, outputs, "9")[0]
    # ImageFromBatch(1, 2) of 4 -> 2 images stitched to the 64 px input with a 4 px spacer
    assert image.size == (64 + 4 + 64, 64) and len(outputs["9"]["images"]) == 2
    # the workflow travels on into the PNG it writes
    assert "prompt" in read_png_text(sd_env[1].output_dir / outputs["9"]["images"][0]["subfolder"]
                                     / outputs["9"]["images"][0]["filename"])


def test_bad_batch_index_in_a_workflow_is_named(sd_env):
    registry, config = sd_env
    prompt = shrink(to_prompt("latent_ops_api.json", registry))
    prompt["10"]["inputs"]["batch_index"] = 7
    result = Executor(registry, config=config).execute(prompt, "bad-index")
    assert result.status == "error"
    assert result.error["exception_message"] == (
        "LatentFromBatch (node 10): batch_index 7 is out of range: the batch has 2 latent(s)")
