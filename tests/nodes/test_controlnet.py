"""ControlNet: a tiny ControlNetModel (made from the tiny SD1 UNet) written in both file layouts, loaded
by the node, attached to conditionings and used while sampling."""
from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from engine.executor import Executor
from nodes.controlnet import canny, canny_node, controlnet_apply, controlnet_apply_advanced, controlnet_loader
from nodes.loaders import checkpoint_loader_simple
from nodes.models.controlnet import ControlApplication, controlnet_diffusers_to_ldm, fit_hint
from nodes.models.state_dict import ModelFileError
from nodes.sampler_nodes import common_ksampler

from .conftest import TINY_SD1, activate


@pytest.fixture(scope="module")
def handles(sd_env):
    activate(sd_env)
    model, clip, _ = checkpoint_loader_simple(TINY_SD1)
    return model, clip


@pytest.fixture(scope="module")
def tiny_cn(handles) -> ControlNetModel:
    model, _ = handles
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cn = ControlNetModel.from_unet(model.unet)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in cn.parameters():   # zero convs start at zero: make the control actually do something
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return cn.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cn_files(sd_env, tiny_cn):
    """Writes the ControlNet as original layout, diffusers folder and bare diffusers file."""
    _, config = sd_env
    root = config.models_dir / "controlnet"
    sd = {k: v.contiguous() for k, v in tiny_cn.state_dict().items()}
    ldm = {"control_model." + k: v for k, v in controlnet_diffusers_to_ldm(sd, tiny_cn.config).items()}
    save_file(ldm, str(root / "tiny-cn-ldm.safetensors"))
    tiny_cn.save_pretrained(root / "tiny-cn-diffusers")
    save_file(sd, str(root / "tiny-cn-bare.safetensors"))
    return {"ldm": "tiny-cn-ldm.safetensors", "diffusers": "tiny-cn-diffusers/diffusion_pytorch_model.safetensors",
            "bare": "tiny-cn-bare.safetensors", "ldm_keys": set(ldm)}


def _hint(batch=1, size=64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, (xx * yy)], dim=-1)
    return img.expand(batch, size, size, 3).contiguous()


def test_original_layout_has_the_real_key_names(cn_files):
    keys = cn_files["ldm_keys"]
    for expected in ("control_model.input_hint_block.0.weight", "control_model.input_hint_block.14.weight",
                     "control_model.zero_convs.0.0.weight", "control_model.middle_block_out.0.bias",
                     "control_model.input_blocks.1.1.proj_in.weight", "control_model.time_embed.0.weight",
                     "control_model.input_blocks.2.0.op.weight", "control_model.middle_block.1.norm.weight"):
        assert expected in keys, expected


@pytest.mark.parametrize("layout", ["ldm", "diffusers", "bare"])
def test_loader_reads_every_layout_exactly(cn_files, tiny_cn, layout):
    handle = controlnet_loader(cn_files[layout])
    loaded = handle.model
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                "conditioning_embedding_out_channels", "use_linear_projection"):
        assert list(loaded.config[key]) == list(tiny_cn.config[key]) if isinstance(tiny_cn.config[key], (list, tuple)) \
            else loaded.config[key] == tiny_cn.config[key], key
    ref = tiny_cn.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_loader_refuses_other_files(sd_env):
    _, config = sd_env
    path = config.models_dir / "controlnet" / "not-a-cn.safetensors"
    save_file({"foo.weight": torch.ones(3)}, str(path))
    with pytest.raises(ModelFileError, match="not a ControlNet"):
        controlnet_loader(path.name)


def _sample(model, positive, negative, steps=2, seed=3):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return common_ksampler(model, seed, steps, 6.0, "euler", "normal", positive, negative, latent)["samples"]


def test_strength_zero_equals_no_control_and_strength_one_differs(handles, cn_files):
    model, clip = handles
    cn = controlnet_loader(cn_files["ldm"])
    pos, neg = clip.encode_text("a house"), clip.encode_text("")
    plain = _sample(model, pos, neg)

    p0, n0 = controlnet_apply_advanced(pos, neg, cn, _hint(), 0.0, 0.0, 1.0)
    assert p0 is pos and n0 is neg
    assert torch.equal(_sample(model, p0, n0), plain)

    p1, n1 = controlnet_apply_advanced(pos, neg, cn, _hint(), 1.0, 0.0, 1.0)
    assert isinstance(p1[0][1]["control"], ControlApplication)
    assert p1[0][1]["control"] is n1[0][1]["control"]            # one application shared by the chain
    assert p1[0][1]["control_apply_to_uncond"] is False
    assert "control" not in pos[0][1]                              # the input conditioning is not modified
    with_control = _sample(model, p1, n1)
    assert not torch.allclose(with_control, plain)

    # an application whose range excludes every evaluated sigma (before start, after end) changes nothing
    p_mid, n_mid = controlnet_apply_advanced(pos, neg, cn, _hint(), 1.0, 0.3, 0.7)
    assert torch.equal(_sample(model, p_mid, n_mid), plain)   # sigmas 14.6 and 0.03: both outside
    # the old node applies to the negative as well, through the denoiser's control_apply_to_uncond
    old = controlnet_apply(pos, cn, _hint(), 1.0)
    assert old[0][1]["control_apply_to_uncond"] is True
    assert not torch.allclose(_sample(model, old, neg), plain)
    assert controlnet_apply(pos, cn, _hint(), 0.0) is pos


def test_chained_controls_add_up(handles, cn_files):
    model, clip = handles
    cn = controlnet_loader(cn_files["diffusers"])
    pos = clip.encode_text("a house")
    first = controlnet_apply(pos, cn, _hint(), 0.6)
    second = controlnet_apply(first, cn, 1.0 - _hint(), 0.3)
    app = second[0][1]["control"]
    assert app.previous is first[0][1]["control"]

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"context": pos[0][0], "sigma": torch.tensor([3.0, 3.0]), "cond_or_uncond": [0, 1]}
    t = torch.tensor([500.0, 500.0])
    both = app.get_control(x, t, cond)
    a = first[0][1]["control"].get_control(x, t, cond)
    b = ControlApplication(cn, 1.0 - _hint(), 0.3).get_control(x, t, cond)
    assert len(both["down"]) == len(a["down"]) == 4    # conv_in, level 0 (resnet, downsample), level 1 (resnet)
    for got, ra, rb in zip(both["down"] + [both["mid"]], a["down"] + [a["mid"]], b["down"] + [b["mid"]]):
        torch.testing.assert_close(got, ra + rb)
    assert both["down"][0].shape == (2, 32, 8, 8)
    # outside its range an application gives nothing (the UNet then runs without residuals)
    late = ControlApplication(cn, _hint(), 1.0, (0.5, 1.0))
    assert late.get_control(x, t, {**cond, "sigma": torch.tensor([14.0, 14.0])}) is None


def test_hint_is_fitted_to_the_latent(handles, cn_files):
    wide = torch.zeros(1, 3, 32, 64)
    wide[:, :, :, 16:48] = 1.0                        # the centre square survives a centre crop to 1:1
    fitted = fit_hint(wide, 64, 64)
    assert fitted.shape == (1, 3, 64, 64) and torch.all(fitted == 1.0)
    cn = controlnet_loader(cn_files["ldm"])
    app = ControlApplication(cn, _hint(batch=1, size=48), 1.0)
    x = torch.zeros(4, 4, 6, 10)
    hint = app.hint_for(x, groups=2)
    assert hint.shape == (4, 3, 48, 80)


def test_controlnet_in_a_graph(sd_env, cn_files):
    registry, _ = sd_env
    info = registry.get("ControlNetApplyAdvanced").info()
    assert info["output_name"] == ["positive", "negative"]
    assert info["input"]["required"]["start_percent"][1] == {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}
    assert "vae" in info["input"]["optional"]
    assert registry.get("ControlNetApply").info()["deprecated"] is True
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "12": {"class_type": "Canny", "inputs": {"image": ["11", 0], "low_threshold": 0.2, "high_threshold": 0.5}},
        "13": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": cn_files["ldm"]}},
        "14": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["13", 0], "image": ["12", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 0.8, "vae": ["4", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["14", 0], "negative": ["14", 1],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    result = Executor(registry).execute(prompt, "cn")
    assert result.status == "success", result.error


def test_canny_finds_the_edges_of_a_square():
    img = torch.zeros(1, 64, 64, 3)
    img[:, 16:48, 16:48] = 1.0
    out = canny_node(img, 0.1, 0.2)
    assert out.shape == (1, 64, 64, 3)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    edges = out[0, :, :, 0]
    assert edges[:10].sum() == 0 and edges[:, :10].sum() == 0 and edges[24:40, 24:40].sum() == 0
    assert edges[14:18, 20:44].sum() >= 20            # the top side of the square is traced
    assert edges[30, 13:19].sum() >= 1                # and the left side
    # hysteresis: a faint edge survives only when it touches a strong one
    faint = torch.zeros(1, 1, 64, 64)
    faint[:, :, :, 32:] = 0.3
    assert canny(faint, 0.05, 0.9).sum() == 0
    assert canny(faint, 0.01, 0.02).sum() > 0
