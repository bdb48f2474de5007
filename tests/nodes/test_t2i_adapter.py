"""T2I-Adapters through ControlNetLoader (diffusers and original TencentARC layouts; full, light and SDXL
adapters) and DiffControlNetLoader (diff ControlNets get the model's weights added back)."""
from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from engine.executor import Executor
from nodes.controlnet import controlnet_apply_advanced, controlnet_loader, diff_controlnet_loader
from nodes.loaders import checkpoint_loader_simple
from nodes.models import ldm_keys
from nodes.models.controlnet import controlnet_diffusers_to_ldm
from nodes.models.t2i_adapter import T2IAdapterHandle
from nodes.models.tiny import tiny_t2i_adapter, write_tiny_checkpoint, write_tiny_t2i_adapter
from nodes.sampler_nodes import common_ksampler

from .conftest import TINY_SD1, activate

TINY_XL = "tiny-sdxl-base.safetensors"
LAYOUTS = [("sd1", False, "diffusers"), ("sd1", False, "original"), ("sd1", False, "folder"),
           ("sd1", True, "diffusers"), ("sd1", True, "original"), ("sdxl", False, "diffusers"),
           ("sdxl", False, "original")]


def _name(arch, light, layout):
    base = f"t2i-{arch}-{'light' if light else 'full'}-{layout}"
    return base if layout == "folder" else base + ".safetensors"


@pytest.fixture(scope="module")
def adapter_files(sd_env):
    activate(sd_env)
    _, config = sd_env
    root = config.models_dir / "controlnet"
    for arch, light, layout in LAYOUTS:
        write_tiny_t2i_adapter(root / _name(arch, light, layout), arch, layout=layout, light=light, seed=2)
    if not (config.models_dir / "checkpoints" / TINY_XL).exists():
        write_tiny_checkpoint(config.models_dir / "checkpoints" / TINY_XL, "sdxl", seed=4)
    return root


def _hint(size=64):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([xx, yy, xx * yy], dim=-1)[None]


@pytest.mark.parametrize("arch,light,layout", LAYOUTS)
def test_control_net_loader_reads_t2i_adapters_exactly(adapter_files, arch, light, layout):
    handle = controlnet_loader(_name(arch, light, layout) + ("/diffusion_pytorch_model.safetensors"
                                                             if layout == "folder" else ""))
    assert isinstance(handle, T2IAdapterHandle)
    ref = tiny_t2i_adapter(arch, light=light, seed=2)
    assert handle.model.config.adapter_type == ref.config.adapter_type
    assert list(handle.model.config.channels) == list(ref.config.channels)
    got = handle.model.state_dict()
    assert got.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k


def test_original_layout_uses_tencentarc_names(adapter_files):
    from safetensors.torch import load_file
    full = set(load_file(adapter_files / _name("sd1", False, "original")))
    assert {"conv_in.weight", "body.0.block1.weight", "body.1.block2.weight", "body.2.in_conv.weight",
            "body.3.block1.weight"} <= full
    light = set(load_file(adapter_files / _name("sd1", True, "original")))
    assert {"body.0.in_conv.weight", "body.0.body.1.block1.weight", "body.2.out_conv.weight"} <= light


def test_adapter_features_are_added_inside_the_down_blocks(adapter_files, sd_env):
    model, clip, _ = checkpoint_loader_simple(TINY_SD1)
    adapter = controlnet_loader(_name("sd1", False, "diffusers"))
    pos, neg = clip.encode_text("a house"), clip.encode_text("")
    p2, _ = controlnet_apply_advanced(pos, neg, adapter, _hint(), 0.7, 0.0, 1.0)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500.0])
    cond = {"context": p2[0][0], "control": p2[0][1]["control"], "sigma": torch.tensor([1.0])}
    got = model.apply(x, t, cond)
    feats = adapter.model(_hint().movedim(-1, 1))
    want = model.unet(x, t, encoder_hidden_states=p2[0][0],
                      down_intrablock_additional_residuals=[f * 0.7 for f in feats], return_dict=False)[0]
    torch.testing.assert_close(got, want)
    plain = model.apply(x, t, {"context": pos[0][0]})
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("ckpt,name", [(TINY_SD1, _name("sd1", False, "original")),
                                       (TINY_SD1, _name("sd1", True, "diffusers")),
                                       (TINY_XL, _name("sdxl", False, "original"))])
def test_t2i_adapter_guides_sampling(adapter_files, ckpt, name):
    model, clip, _ = checkpoint_loader_simple(ckpt)
    adapter = controlnet_loader(name)
    pos, neg = clip.encode_text("a house"), clip.encode_text("")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    base = common_ksampler(model, 5, 2, 6.0, "euler", "normal", pos, neg, latent)["samples"]
    p2, n2 = controlnet_apply_advanced(pos, neg, adapter, _hint(), 1.0, 0.0, 1.0)
    guided = common_ksampler(model, 5, 2, 6.0, "euler", "normal", p2, n2, latent)["samples"]
    assert torch.isfinite(guided).all() and not torch.allclose(base, guided)
    # strength 0 is a passthrough; an active range that ends before the first step changes nothing
    p0, n0 = controlnet_apply_advanced(pos, neg, adapter, _hint(), 0.0, 0.0, 1.0)
    torch.testing.assert_close(common_ksampler(model, 5, 2, 6.0, "euler", "normal", p0, n0, latent)["samples"], base)


def test_sdxl_adapter_needs_sides_in_multiples_of_sixteen(adapter_files):
    model, clip, _ = checkpoint_loader_simple(TINY_XL)
    adapter = controlnet_loader(_name("sdxl", False, "diffusers"))
    pos, neg = clip.encode_text("a"), clip.encode_text("")
    p2, n2 = controlnet_apply_advanced(pos, neg, adapter, _hint(72), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="multiples of 16"):
        common_ksampler(model, 5, 1, 6.0, "euler", "normal", p2, n2, {"samples": torch.zeros(1, 4, 9, 9)})


def test_style_adapter_is_refused_with_the_file_named(sd_env, adapter_files):
    registry, config = sd_env
    save_file({"style_embedding": torch.zeros(1, 8, 16), "conv_in.weight": torch.zeros(4, 4, 1, 1)},
              str(adapter_files / "t2i-style.safetensors"))
    prompt = {"1": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "t2i-style.safetensors"}},
              "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
              "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["2", 1]}},
              "4": {"class_type": "ControlNetApply", "inputs": {"conditioning": ["3", 0], "control_net": ["1", 0],
                                                                "image": ["6", 0], "strength": 1.0}},
              "6": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "5": {"class_type": "KSampler", "inputs": {
                  "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                  "model": ["2", 0], "positive": ["4", 0], "negative": ["3", 0], "latent_image": ["7", 0]}},
              "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["2", 2]}},
              "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}
    result = Executor(registry).execute(prompt, "style-adapter")
    assert result.status == "error" and result.error["node_id"] == "1"
    msg = result.error["exception_message"]
    assert "t2i-style.safetensors" in msg and "style T2I-Adapters" in msg


def test_diff_controlnet_loader_adds_the_model_weights_back(sd_env, adapter_files):
    model, _, _ = checkpoint_loader_simple(TINY_SD1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cn = ControlNetModel.from_unet(model.unet)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ldm = controlnet_diffusers_to_ldm({k: v.contiguous() for k, v in cn.state_dict().items()}, cn.config)
    base = ldm_keys.unet_diffusers_to_ldm(model.unet.state_dict(), model.unet.config)
    diff = {"control_model." + k: (v - base[k] if k in base and base[k].shape == v.shape else v).contiguous()
            for k, v in ldm.items()}
    assert sum(k[len("control_model."):] in base for k in diff) > 10
    diff["difference"] = torch.tensor([])
    save_file(diff, str(adapter_files / "tiny-cn-diff.safetensors"))

    loaded = diff_controlnet_loader(model, "tiny-cn-diff.safetensors").model.state_dict()
    for k, v in cn.state_dict().items():
        torch.testing.assert_close(loaded[k], v, msg=k)
    # without the model the differences are loaded as they are (ComfyUI warns; the weights are wrong)
    raw = controlnet_loader("tiny-cn-diff.safetensors").model.state_dict()
    assert not torch.allclose(raw["conv_in.weight"], cn.state_dict()["conv_in.weight"])
    # T2I-Adapters load through the diff loader too
    assert isinstance(diff_controlnet_loader(model, _name("sd1", False, "diffusers")), T2IAdapterHandle)
