"""Model merge nodes (recorded patches, built once on use) and the save nodes (original layout,
ComfyUI's metadata), with a 3-way merge saved as a checkpoint and loaded back."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from engine.executor import Executor
from nodes.loaders import checkpoint_loader_simple
from nodes.model_merging import model_merge_add, model_merge_blocks, model_merge_simple, model_merge_subtract
from nodes.models.merge import _ldm_names
from nodes.models.tiny import write_tiny_checkpoint

from .conftest import TINY_SD1, activate

OTHERS = ("tiny-sd1-b.safetensors", "tiny-sd1-c.safetensors")


@pytest.fixture(scope="module")
def three(sd_env):
    activate(sd_env)
    _, config = sd_env
    for seed, name in enumerate(OTHERS, start=31):
        if not (config.models_dir / "checkpoints" / name).exists():
            write_tiny_checkpoint(config.models_dir / "checkpoints" / name, "sd1", seed=seed)
    return [checkpoint_loader_simple(n) for n in (TINY_SD1, *OTHERS)]


def _params(model):
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def test_merges_follow_comfyui_formulas(three):
    (a, _, _), (b, _, _), _ = three
    wa, wb = _params(a), _params(b)
    key = next(k for k in wa if wa[k].is_floating_point() and wa[k].numel() > 1)
    torch.testing.assert_close(model_merge_simple(a, b, 0.3).unet.state_dict()[key], 0.3 * wa[key] + 0.7 * wb[key])
    torch.testing.assert_close(model_merge_add(a, b).unet.state_dict()[key], wa[key] + wb[key])
    torch.testing.assert_close(model_merge_subtract(a, b, 2.0).unet.state_dict()[key], 2.0 * (wa[key] - wb[key]))
    # the inputs are untouched: nothing is written into shared weights
    for k, v in _params(a).items():
        assert torch.equal(v, wa[k]), k


def test_block_merge_picks_ratio_by_ldm_block(three):
    (a, _, _), (b, _, _), _ = three
    wa, wb = _params(a), _params(b)
    # cloned: the merge is written into the shared module, which `a.unet` below restores
    merged = {k: v.clone() for k, v in model_merge_blocks(a, b, 0.1, 0.5, 0.9).unet.state_dict().items()}
    names = _ldm_names(a.unet)
    want = {"input_blocks": 0.1, "middle_block": 0.5, "output_blocks": 0.9, "out.": 0.9, "time_embed": 0.1}
    seen = set()
    for key, ldm in names.items():
        for prefix, r in want.items():
            if ldm.startswith(prefix):
                torch.testing.assert_close(merged[key], r * wa[key] + (1 - r) * wb[key])
                seen.add(prefix)
    assert seen == set(want)


def test_a_new_ratio_patches_the_base_in_place(three):
    """A merge is written into the base UNet's own tensors: another ratio restores and re-patches them,
    no module or storage is added, and the base handle gets its exact weights back."""
    (a, _, _), (b, _, _), _ = three
    wa, wb = _params(a), _params(b)
    ptrs = {k: p.data_ptr() for k, p in a.base_unet.named_parameters()}
    first, second = model_merge_simple(a, b, 0.2), model_merge_simple(a, b, 0.8)
    for handle, r in ((first, 0.2), (second, 0.8), (first, 0.2)):
        unet = handle.unet
        assert unet is a.base_unet and len(a._weights.modules) == 1
        assert {k: p.data_ptr() for k, p in unet.named_parameters()} == ptrs
        for k, v in unet.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, r * wa[k] + (1 - r) * wb[k])
    # the cost is the kept originals (every float weight changes in a merge), counted once
    patcher = a._weights.patcher("unet")
    assert patcher.extra_bytes() == sum(p.numel() * p.element_size() for p in a.base_unet.parameters())
    assert a.unet is a.base_unet and patcher.extra_bytes() == 0
    for k, v in a.base_unet.state_dict().items():
        assert torch.equal(v, wa[k]), k


def test_merging_different_architectures_is_refused(sd_env, three):
    _, config = sd_env
    name = "tiny-sdxl-merge.safetensors"
    write_tiny_checkpoint(config.models_dir / "checkpoints" / name, "sdxl", seed=40)
    xl = checkpoint_loader_simple(name)[0]
    with pytest.raises(ValueError, match="model2 is an sdxl model"):
        model_merge_simple(three[0][0], xl, 0.5)


def _prompt():
    ratio = {"ModelMergeSimple": 0.6}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": OTHERS[0]}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": OTHERS[1]}},
        "4": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0],
                                                           "ratio": ratio["ModelMergeSimple"]}},
        "5": {"class_type": "ModelMergeBlocks", "inputs": {"model1": ["4", 0], "model2": ["3", 0],
                                                           "input": 0.7, "middle": 0.5, "out": 0.3}},
        "6": {"class_type": "CheckpointSave", "inputs": {"model": ["5", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "filename_prefix": "checkpoints/threeway"}},
    }


def test_three_way_merge_saved_and_reloaded(sd_env, three):
    registry, config = sd_env
    prompt = _prompt()
    workflow = {"nodes": [], "links": [], "version": 0.4}
    result = Executor(registry).execute(prompt, "merge-3", extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert result.status == "success", result.error
    path = config.output_dir / "checkpoints" / "threeway_00001_.safetensors"
    assert path.exists()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["prompt"]) == prompt and json.loads(meta["workflow"]) == workflow
    assert meta["modelspec.predict_key"] == "epsilon"
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)

    # the file loads as a checkpoint holding the merged weights
    (a, _, _), (b, _, _), (c, _, _) = three
    want = model_merge_blocks(model_merge_simple(a, b, 0.6), c, 0.7, 0.5, 0.3).unet.state_dict()
    (config.models_dir / "checkpoints" / "threeway.safetensors").write_bytes(path.read_bytes())
    reloaded = checkpoint_loader_simple("threeway.safetensors")[0]
    got = reloaded.unet.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=key)
    # a second save counts on
    assert Executor(registry).execute(prompt, "merge-3b").status == "success"
    assert (config.output_dir / "checkpoints" / "threeway_00002_.safetensors").exists()


def test_save_prefix_cannot_leave_the_output_folder(sd_env, three):
    registry, _ = sd_env
    prompt = _prompt()
    prompt["6"]["inputs"]["filename_prefix"] = "../../escaped"
    result = Executor(registry).execute(prompt, "merge-escape")
    assert result.status == "error" and result.error["node_id"] == "6"
    assert "filename_prefix" in result.error["exception_message"]


def test_model_and_vae_save_load_back(sd_env, three):
    from nodes.loaders import unet_loader, vae_loader

    registry, config = sd_env
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
              "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": "unets/solo"}},
              "3": {"class_type": "VAESave", "inputs": {"vae": ["1", 2], "filename_prefix": "vaes/solo"}}}
    assert Executor(registry).execute(prompt, "save-parts").status == "success"
    unet_file = config.output_dir / "unets" / "solo_00001_.safetensors"
    vae_file = config.output_dir / "vaes" / "solo_00001_.safetensors"
    (config.models_dir / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (config.models_dir / "diffusion_models" / "solo.safetensors").write_bytes(unet_file.read_bytes())
    (config.models_dir / "vae" / "solo.safetensors").write_bytes(vae_file.read_bytes())
    model, _, vae = three[0]
    got = unet_loader("solo.safetensors", "default").unet.state_dict()
    for key, value in model.unet.state_dict().items():
        assert torch.equal(got[key], value), key
    got_vae = vae_loader("solo.safetensors").vae.state_dict()
    for key, value in vae.vae.state_dict().items():
        assert torch.equal(got_vae[key], value), key


@pytest.mark.parametrize("node_name,count", [("ModelMergeSD1", 29), ("ModelMergeSD2", 29), ("ModelMergeSDXL", 24)])
def test_model_specific_merges_take_a_ratio_per_block(sd_env, three, node_name, count):
    registry, _ = sd_env
    required = registry.object_info()[node_name]["input"]["required"]
    blocks = [k for k in required if k not in ("model1", "model2")]
    assert len(blocks) == count and "middle_block.1." in blocks and "out." in blocks
    assert required["time_embed."] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]
    if node_name == "ModelMergeSDXL":
        assert "label_emb." in blocks and "input_blocks.9." not in blocks
        return
    ratios = {k: 1.0 for k in blocks}
    ratios["output_blocks.1."] = 0.0   # only this block comes from model2
    (a, _, _), (b, _, _), _ = three
    merged_model = registry.get(node_name).fn(model1=a, model2=b, **ratios)
    merged = {k: v.clone() for k, v in merged_model.unet.state_dict().items()}
    wa, wb = _params(a), _params(b)
    names = _ldm_names(a.unet)
    assert any(ldm.startswith("output_blocks.1.") for ldm in names.values())
    for key, ldm in names.items():
        torch.testing.assert_close(merged[key], wb[key] if ldm.startswith("output_blocks.1.") else wa[key])


def test_clip_merges_and_clip_save(sd_env, three):
    from nodes.model_merging import clip_merge_add, clip_merge_simple, clip_merge_subtract

    registry, config = sd_env
    (_, c1, _), (_, c2, _), _ = three
    e1, e2 = c1.text_encoders["l"].state_dict(), c2.text_encoders["l"].state_dict()
    key = next(k for k in e1 if k.endswith("q_proj.weight"))
    torch.testing.assert_close(clip_merge_simple(c1, c2, 0.25).text_encoders["l"].state_dict()[key],
                               0.25 * e1[key] + 0.75 * e2[key])
    torch.testing.assert_close(clip_merge_add(c1, c2).text_encoders["l"].state_dict()[key], e1[key] + e2[key])
    torch.testing.assert_close(clip_merge_subtract(c1, c2, 0.5).text_encoders["l"].state_dict()[key],
                               0.5 * (e1[key] - e2[key]))
    assert torch.equal(c1.text_encoders["l"].state_dict()[key], e1[key])  # inputs untouched
    cond = clip_merge_simple(c1, c2, 0.5).encode_text("a photo")[0][0]
    assert not torch.allclose(cond, c1.encode_text("a photo")[0][0])

    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
              "2": {"class_type": "CLIPSave", "inputs": {"clip": ["1", 1], "filename_prefix": "clip/solo"}}}
    assert Executor(registry).execute(prompt, "clip-save").status == "success"
    path = config.output_dir / "clip" / "solo_clip_l_00001_.safetensors"
    with safe_open(str(path), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["prompt"]) == prompt
    assert saved and all(k.startswith("text_model.") for k in saved)
    assert torch.equal(saved["text_model." + key.removeprefix("text_model.")], e1[key])
