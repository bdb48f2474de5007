"""GLIGENLoader / GLIGENTextBoxApply: a tiny GLIGEN file in the original key layout, written from a tiny
diffusers gated UNet, against that diffusers UNet itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nodes.conditioning import clip_text_encode, gligen_text_box_apply
from nodes.loaders import checkpoint_loader_simple, gligen_loader
from nodes.models.state_dict import ModelFileError
from nodes.models.tiny import tiny_gligen_unet, write_tiny_gligen

from .conftest import TINY_SD1, activate
from .test_workflows import WORKFLOWS

GLIGEN = "gligen_tiny_textbox.safetensors"


@pytest.fixture(scope="module")
def gligen_env(sd_env):
    activate(sd_env)
    _, config = sd_env
    unet = tiny_gligen_unet("sd1", seed=0)
    write_tiny_gligen(config.models_dir / "gligen" / GLIGEN, unet)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)},
              str(config.models_dir / "gligen" / "a-lora.safetensors"))
    return sd_env, unet


def test_file_has_the_original_layout(gligen_env):
    (_, config), _ = gligen_env
    keys = load_file(str(config.models_dir / "gligen" / GLIGEN)).keys()
    assert "position_net.null_positive_feature" in keys and "position_net.linears.4.weight" in keys
    assert "input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight" in keys
    assert "middle_block.1.transformer_blocks.0.fuser.alpha_attn" in keys
    assert "output_blocks.3.1.transformer_blocks.0.fuser.ff.net.2.weight" in keys


def test_loader_and_text_box_apply(gligen_env):
    (registry, _), unet = gligen_env
    info = registry.node_info("GLIGENTextBoxApply")["input"]["required"]
    assert info["width"][1]["default"] == 64 and info["width"][1]["min"] == 8 and info["width"][1]["step"] == 8
    assert info["x"][1]["default"] == 0 and info["x"][1]["min"] == 0
    assert GLIGEN in registry.node_info("GLIGENLoader")["input"]["required"]["gligen_name"][0]
    gligen = gligen_loader(GLIGEN)
    assert len(gligen.fusers) == 4  # down 1, mid 1, up 2
    for got, want in zip(gligen.fusers, [b.fuser for b in _blocks(unet)]):
        for (k, a), (_, b) in zip(sorted(got.state_dict().items()), sorted(want.state_dict().items())):
            assert torch.equal(a, b), k
    _, clip, _ = checkpoint_loader_simple(TINY_SD1)
    cond = clip_text_encode("a garden", clip)
    one = gligen_text_box_apply(cond, clip, gligen, "a red ball", 32, 24, 8, 16)
    two = gligen_text_box_apply(one, clip, gligen, "a cat", 16, 16, 40, 40)
    kind, handle, boxes = two[0][1]["gligen"]
    assert kind == "position" and handle is gligen and len(boxes) == 2
    pooled = clip.encode(clip.tokenize("a red ball"))[1]
    assert torch.equal(boxes[0][0], pooled) and boxes[0][1:] == (3, 4, 2, 1)
    assert boxes[1][1:] == (2, 2, 5, 5)
    assert "gligen" not in cond[0][1]  # the input conditioning is untouched


def _blocks(unet):
    from nodes.models.gligen import transformer_blocks
    return transformer_blocks(unet)


def test_one_unet_call_matches_diffusers_gated_unet(gligen_env):
    (_, _), ref = gligen_env
    model, clip, _ = checkpoint_loader_simple(TINY_SD1)
    gligen = gligen_loader(GLIGEN)
    cond = clip_text_encode("a garden", clip)
    cond = gligen_text_box_apply(cond, clip, gligen, "a red ball", 32, 24, 8, 16)
    cond = gligen_text_box_apply(cond, clip, gligen, "a cat", 16, 16, 40, 40)
    context, opts = cond[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500.0])
    kw = gligen.inputs_for(opts["gligen"][2], 1, 8, 8, torch.device("cpu"), torch.float32)
    assert torch.allclose(kw["boxes"][0, 0], torch.tensor([1 / 8, 2 / 8, 5 / 8, 5 / 8]))
    assert kw["masks"][0].tolist() == [1.0, 1.0] + [0.0] * 28
    ours = model.apply(x, t, {"context": context, "gligen": (gligen, kw)})
    plain = model.apply(x, t, {"context": context})
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": kw}, return_dict=False)[0]
    assert (ours - plain).abs().max() > 1e-3  # grounding changes the prediction
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)
    assert not hasattr(model.unet, "position_net")  # detached again after the call


def test_wrong_file_kind_is_a_clear_error(gligen_env):
    with pytest.raises(ModelFileError, match="GLIGENLoader input gligen_name 'a-lora.safetensors': not a GLIGEN model"):
        gligen_loader("a-lora.safetensors")


def _ui_with_boxes(boxes: list[tuple[str, int, int, int, int]]) -> dict:
    """workflows/txt2img.json as ComfyUI's editor saves it after adding a Load GLIGEN node and a chain of
    GLIGENTextBoxApply nodes between the positive prompt and the KSampler."""
    ui = json.loads((WORKFLOWS / "txt2img.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = ui["links"]
    next_link = max(link[0] for link in links) + 1

    def link(src: int, src_slot: int, dst: int, dst_slot: int, kind: str) -> int:
        nonlocal next_link
        lid, next_link = next_link, next_link + 1
        links.append([lid, src, src_slot, dst, dst_slot, kind])
        nodes[src]["outputs"][src_slot]["links"].append(lid)
        return lid

    positive = next(link for link in links if link[3] == 3 and link[4] == 1)  # prompt 6 -> KSampler positive
    links.remove(positive)
    nodes[6]["outputs"][0]["links"].remove(positive[0])
    loader = {"id": 10, "type": "GLIGENLoader", "pos": [50, 400], "size": [315, 58], "flags": {}, "order": 1,
              "mode": 0, "inputs": [], "outputs": [{"name": "GLIGEN", "type": "GLIGEN", "links": [],
                                                   "slot_index": 0}],
              "properties": {"Node name for S&R": "GLIGENLoader"}, "widgets_values": [GLIGEN]}
    ui["nodes"].append(loader)
    nodes[10] = loader
    prev = 6
    for i, (text, w, h, x, y) in enumerate(boxes):
        nid = 11 + i
        box = {"id": nid, "type": "GLIGENTextBoxApply", "pos": [400, 400 + 250 * i], "size": [400, 230],
               "flags": {}, "order": 5 + i, "mode": 0,
               "inputs": [{"name": "conditioning_to", "type": "CONDITIONING", "link": None},
                          {"name": "clip", "type": "CLIP", "link": None},
                          {"name": "gligen_textbox_model", "type": "GLIGEN", "link": None}],
               "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [], "slot_index": 0}],
               "properties": {"Node name for S&R": "GLIGENTextBoxApply"}, "widgets_values": [text, w, h, x, y]}
        ui["nodes"].append(box)
        nodes[nid] = box
        box["inputs"][0]["link"] = link(prev, 0, nid, 0, "CONDITIONING")
        box["inputs"][1]["link"] = link(4, 1, nid, 1, "CLIP")
        box["inputs"][2]["link"] = link(10, 0, nid, 2, "GLIGEN")
        prev = nid
    next(i for i in nodes[3]["inputs"] if i["name"] == "positive")["link"] = link(prev, 0, 3, 1, "CONDITIONING")
    ui["last_node_id"], ui["last_link_id"] = max(nodes), next_link - 1
    return ui


def _api_with_boxes(boxes: list[tuple[str, int, int, int, int]]) -> dict:
    api = json.loads((WORKFLOWS / "txt2img_api.json").read_text())
    api["10"] = {"class_type": "GLIGENLoader", "inputs": {"gligen_name": GLIGEN}, "_meta": {"title": "Load GLIGEN"}}
    prev = "6"
    for i, (text, w, h, x, y) in enumerate(boxes):
        nid = str(11 + i)
        api[nid] = {"class_type": "GLIGENTextBoxApply",
                    "inputs": {"text": text, "width": w, "height": h, "x": x, "y": y, "conditioning_to": [prev, 0],
                               "clip": ["4", 1], "gligen_textbox_model": ["10", 0]},
                    "_meta": {"title": "GLIGENTextBoxApply"}}
        prev = nid
    api["3"]["inputs"]["positive"] = [prev, 0]
    return api


TWO_BOXES = [("a red ball", 32, 32, 0, 0), ("a small cat", 32, 24, 32, 40)]


def test_ui_and_api_workflow_with_two_boxes_runs(gligen_env):
    from engine.executor import Executor
    from engine.ui_workflow import ui_to_api

    from .conftest import shrink

    (registry, config), _ = gligen_env
    ui, api = _ui_with_boxes(TWO_BOXES), _api_with_boxes(TWO_BOXES)
    converted = ui_to_api(ui, registry.object_info())
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in converted.items()} == \
        {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    images = []
    for prompt, pid in ((shrink(converted), "gligen-ui"), (shrink(api), "gligen-api"),
                        (shrink(json.loads((WORKFLOWS / "txt2img_api.json").read_text())), "plain")):
        result = Executor(registry).execute(prompt, pid)
        assert result.status == "success", result.error
        img = result.outputs["9"]["images"][0]
        with Image.open(config.output_dir / img["subfolder"] / img["filename"]) as im:
            images.append(np.asarray(im.convert("RGB")).astype(np.int16))
    assert np.array_equal(images[0], images[1])  # the UI and the API form are the same prompt
    assert np.abs(images[0] - images[2]).max() > 0  # the boxes change the picture


def test_box_outside_the_image_is_a_clear_error(gligen_env):
    from engine.executor import Executor

    from .conftest import shrink

    (registry, _), _ = gligen_env
    result = Executor(registry).execute(shrink(_api_with_boxes([("far away", 64, 64, 512, 0)])), "gligen-outside")
    assert result.status == "error"
    assert "GLIGENTextBoxApply: the text box at x=512, y=0 (size 64x64) lies outside the 64x64 image" \
        in str(result.error)


def test_full_run_matches_diffusers_gligen_pipeline(gligen_env):
    """KSampler (euler / normal, cfg 1) with two text boxes against StableDiffusionGLIGENPipeline on the same
    weights and start noise. ComfyUI grounds every step, so the pipeline's scheduled sampling is off (beta 1);
    cfg 1 because the pipeline also grounds the negative side (with masked-out boxes), ComfyUI does not."""
    import math

    from diffusers import EulerDiscreteScheduler, StableDiffusionGLIGENPipeline

    from nodes.models import detect
    from nodes.sampler_nodes import common_ksampler

    (_, _), ref_unet = gligen_env
    model, clip, vae = checkpoint_loader_simple(TINY_SD1)
    gligen = gligen_loader(GLIGEN)
    prompt, seed, steps, size = "a garden", 7, 4, 64
    positive = clip_text_encode(prompt, clip)
    boxes = [("a red ball", 32, 32, 0, 0), ("a small cat", 24, 32, 32, 24)]  # text, w, h, x, y (pixels)
    grounded = positive
    for text, w, h, x, y in boxes:
        grounded = gligen_text_box_apply(grounded, clip, gligen, text, w, h, x, y)
    negative = clip_text_encode("", clip)
    empty = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    ours = common_ksampler(model, seed, steps, 1.0, "euler", "normal", grounded, negative, empty)["samples"]
    plain = common_ksampler(model, seed, steps, 1.0, "euler", "normal", positive, negative, empty)["samples"]

    sched = EulerDiscreteScheduler.from_config(detect.shipped_config("sd1", "scheduler"), timestep_spacing="linspace")
    sched.set_timesteps(steps)
    factor = math.sqrt(1.0 + float(sched.sigmas.max()) ** 2) / float(sched.init_noise_sigma)  # see test_parity
    noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))
    pipe = StableDiffusionGLIGENPipeline(
        vae=vae.vae, text_encoder=clip.text_encoders["l"], tokenizer=clip.tokenizers["l"], unet=ref_unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
                    gligen_phrases=[b[0] for b in boxes],
                    gligen_boxes=[[x / size, y / size, (x + w) / size, (y + h) / size] for _, w, h, x, y in boxes],
                    gligen_scheduled_sampling_beta=1.0, latents=noise * factor, output_type="latent").images
    # LATENT holds raw VAE latents; the pipeline's "latent" output is in model space (x the scaling factor)
    ours, plain = ours * vae.vae.config.scaling_factor, plain * vae.vae.config.scaling_factor
    rel = float((ours - want).abs().max() / want.abs().max())
    assert rel < 1e-4, rel
    assert float((plain - want).abs().max() / want.abs().max()) > 100 * max(rel, 1e-6)


def test_gligen_for_another_model_shape_is_a_clear_error(gligen_env):
    from engine.executor import Executor

    from .conftest import shrink

    (registry, config), _ = gligen_env
    sd = load_file(str(config.models_dir / "gligen" / GLIGEN))
    save_file({k: v for k, v in sd.items() if not k.startswith("output_blocks.3.")},
              str(config.models_dir / "gligen" / "gligen_other.safetensors"))
    api = _api_with_boxes(TWO_BOXES)
    api["10"]["inputs"]["gligen_name"] = "gligen_other.safetensors"
    result = Executor(registry).execute(shrink(api), "gligen-other")
    assert result.status == "error"
    assert "'gligen_other.safetensors' has 3 fuser blocks, the model has 4 transformer blocks" in str(result.error)
    # the loaded UNet is left clean: a later plain run works
    plain = Executor(registry).execute(shrink(json.loads((WORKFLOWS / "txt2img_api.json").read_text())), "after")
    assert plain.status == "success", plain.error
