"""Helper-surface gaps found by measuring real packs (bench/custom_node_packs.py), each with a pack
written for the test in the shape that hit it, loaded and run by a real `sdflow run`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.custom_nodes.test_packs import sdflow, ui_lines

GAP_PACKS = Path(__file__).resolve().parent / "gap_packs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from nodes.models.tiny import write_demo_checkpoint

    data = tmp_path_factory.mktemp("gaps") / "data"
    write_demo_checkpoint(data / "models")
    return data


def test_comfy_api_latest_extras_import_and_fail_only_when_used(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "ok.json"
    wf.write_text(json.dumps({"1": {"class_type": "GapShout", "inputs": {"text": "abc"}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert "latest_extras_pack: 2 node(s)" in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert ui_lines(done.stderr)["1"]["text"] == ["ABC"]

    wf.write_text(json.dumps({"1": {"class_type": "GapPreview", "inputs": {"text": "abc"}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert done.returncode == 2, done.stderr
    assert "comfy_api.latest.ui.PreviewText is not supported by sdflow" in done.stderr, done.stderr
    assert "GapPreview" in done.stderr
    assert "Traceback" not in done.stderr


def test_execution_module_imports_and_fails_only_when_used(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "exec.json"
    wf.write_text(json.dumps({"1": {"class_type": "GapTypeName", "inputs": {"n": 1}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert "executor_patch_pack: 1 node(s)" in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert "execution.full_type_name is not supported by sdflow" in done.stderr, done.stderr
    assert "GapTypeName" in done.stderr
    assert "Traceback" not in done.stderr


def test_latent_preview_has_the_preview_method_enum_and_args(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "preview.json"
    wf.write_text(json.dumps({"1": {"class_type": "GapPreviewMethod", "inputs": {"method": "taesd"}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert done.returncode == 0, done.stderr
    assert ui_lines(done.stderr)["1"]["text"] == ["taesd"]


def test_unet_key_tables_load_with_a_pack_and_name_real_checkpoint_keys(data_dir: Path, tmp_path: Path) -> None:
    wf = tmp_path / "unet.json"
    wf.write_text(json.dumps({"1": {"class_type": "GapUnetMap", "inputs": {"resnet_key": "in_layers.2.weight"}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert done.returncode == 0, done.stderr
    assert ui_lines(done.stderr)["1"]["text"] == ["conv1.weight"]
    assert ui_lines(done.stderr)["1"]["counts"] == [6, 21, 14]

    # The LDM-side names are the real key names of an SD1 checkpoint's UNet (the tiny one, real layout).
    import safetensors.torch

    from nodes.comfy_compat import utils

    ckpt = next((data_dir / "models" / "checkpoints").glob("*.safetensors"))
    keys = {k.removeprefix("model.diffusion_model.") for k in safetensors.torch.load_file(str(ckpt))
            if k.startswith("model.diffusion_model.")}
    resnet = {k.removeprefix("input_blocks.1.0.") for k in keys if k.startswith("input_blocks.1.0.")}
    assert resnet and resnet <= set(utils.UNET_MAP_RESNET)
    attention = {k.removeprefix("input_blocks.1.1.") for k in keys
                 if k.startswith("input_blocks.1.1.") and ".transformer_blocks." not in k}
    assert attention == utils.UNET_MAP_ATTENTIONS
    block = {k.removeprefix("input_blocks.1.1.transformer_blocks.0.") for k in keys
             if k.startswith("input_blocks.1.1.transformer_blocks.0.")}
    assert block == utils.TRANSFORMER_BLOCKS
    top = {ldm for ldm, _ in utils.UNET_MAP_BASIC if not ldm.startswith("label_emb.")}   # SD1 has no label_emb
    assert top <= keys


def test_binary_event_types_import_beside_prompt_server(data_dir: Path, tmp_path: Path) -> None:
    from server import ws

    wf = tmp_path / "frames.json"
    wf.write_text(json.dumps({"1": {"class_type": "GapFrameType", "inputs": {"kind": "UNENCODED_PREVIEW_IMAGE"}},
                              "2": {"class_type": "GapFrameType", "inputs": {"kind": "TEXT"}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert done.returncode == 0, done.stderr
    # The codes a pack sends with are the ones sdflow's websocket frames use.
    assert ui_lines(done.stderr)["1"]["code"] == [ws.UNENCODED_PREVIEW_IMAGE]
    assert ui_lines(done.stderr)["2"]["code"] == [ws.TEXT]


def test_conditioning_set_mask_by_its_comfyui_method_name(data_dir: Path, tmp_path: Path) -> None:
    ckpt = next((data_dir / "models" / "checkpoints").glob("*.safetensors")).name
    wf = tmp_path / "mask.json"
    wf.write_text(json.dumps({
        "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["c", 1]}},
        "m": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "1": {"class_type": "GapMaskedCond", "inputs": {"conditioning": ["p", 0], "mask": ["m", 0]}}}))
    done = sdflow("run", str(wf), "--data-dir", str(data_dir), "--custom-nodes", str(GAP_PACKS))
    assert done.returncode == 0, done.stderr
    assert ui_lines(done.stderr)["1"] == {"entries": [1], "changed": [True]}
