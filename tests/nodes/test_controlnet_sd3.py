"""SD3 / SD3.5 ControlNets: tiny random-weight SD3ControlNetModels written in Stability's SD3.5 layout
and in diffusers' layouts, loaded by ControlNetLoader's loading code, and sampling with them against
diffusers' StableDiffusion3ControlNetPipeline on the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from nodes.controlnet import controlnet_apply, controlnet_apply_advanced, controlnet_apply_sd3
from nodes.models import sd3
from nodes.models.controlnet import load_control_handle
from nodes.models.controlnet_sd3 import SD3ControlNetHandle, preprocess_for
from nodes.models.sd3_handles import SD3ClipHandle, SD3ModelHandle
from nodes.models.state_dict import ModelFileError
from nodes.models.tiny_sd3 import tiny_sd3_controlnet, tiny_sd3_models, tiny_t5_tokenizer, write_tiny_sd3_controlnet
from nodes.models.tokenizer import load_tokenizer
from nodes.models.vae import VaeHandle
from nodes.sampling.sample import prepare_noise, sample

LAYOUTS = [("sd35", "stability"), ("sd35", "diffusers"), ("sd35", "diffusers_file"),
           ("instantx", "diffusers"), ("instantx", "diffusers_file")]


def _models(kind: str) -> dict:
    """The tiny SD3.5 (for Stability-style ControlNets) or SD3 (InstantX-style) models. The VAE's
    posterior variance is made negligible (log-variance bias -60, clamped to -30 by diffusers: std
    3e-7) so that the pipeline's `latent_dist.sample()` of the hint equals the mode sdflow encodes to."""
    models = tiny_sd3_models(sd35=kind == "sd35")
    vae = models["vae"]
    moments = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    with torch.no_grad():
        moments.bias[vae.config.latent_channels:] = -60.0
    return models


def _checkpoint(tmp_path, kind: str):
    from safetensors.torch import save_file

    m = _models(kind)
    sd = sd3.checkpoint_state_dict(m["transformer"], m["vae"], {k: m[k] for k in ("l", "g", "t5")})
    path = tmp_path / f"tiny_{kind}_base.safetensors"
    save_file(sd, str(path))
    ck = sd3.load_sd3_checkpoint(path)
    assert ck.transformer is not None and ck.vae is not None
    tok = tiny_t5_tokenizer()
    clip = SD3ClipHandle(ck.text_encoders, {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tok},
                         device="cpu")
    return SD3ModelHandle(ck.transformer, ck.variant, device="cpu"), clip, VaeHandle(ck.vae, device="cpu")


def _hint_pixels(seed: int = 4) -> np.ndarray:
    """A 64x64 RGB hint: smooth shapes plus noise, uint8."""
    yy, xx = np.mgrid[0:64, 0:64]
    rng = np.random.default_rng(seed)
    base = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx - 32) ** 2 + (yy - 32) ** 2 < 300) * 255], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _image(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


@pytest.mark.parametrize(("kind", "layout"), LAYOUTS)
def test_loader_reads_every_layout_into_the_same_model(tmp_path, kind, layout):
    target = tmp_path / ("cn" if layout == "diffusers" else "cn.safetensors")
    control_type = 2 if layout == "stability" else None
    path = write_tiny_sd3_controlnet(target, kind=kind, layout=layout, control_type=control_type)
    handle = load_control_handle(path)
    assert isinstance(handle, SD3ControlNetHandle)
    got, want = handle.model.state_dict(), tiny_sd3_controlnet(kind).state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        if k == "pos_embed.pos_embed":  # the sin-cos table each build recomputes (last bit may differ)
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[k], v), k
    assert handle.control_type == control_type
    assert handle.zero_pooled == (kind == "instantx")
    assert (handle.model.pos_embed is None) == (kind == "sd35")


def test_stability_layout_uses_the_released_key_names(tmp_path):
    from safetensors import safe_open

    path = write_tiny_sd3_controlnet(tmp_path / "sd3.5_large_controlnet_canny.safetensors", control_type=1)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert float(f.get_tensor("control_type")) == 1.0
    assert {"controlnet_blocks.1.weight", "pos_embed_input.proj.weight", "transformer_blocks.0.attn.qkv.weight",
            "transformer_blocks.0.attn.proj.bias", "transformer_blocks.1.mlp.fc2.weight",
            "transformer_blocks.0.adaLN_modulation.1.weight",
            "time_text_embed.text_embedder.linear_1.weight"} <= keys
    assert not any(".to_q." in k or "norm1." in k for k in keys)


@pytest.mark.parametrize("kind", ["sd35", "instantx"])
def test_txt2img_with_control_matches_the_diffusers_pipeline(tmp_path, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline

    model, clip, vae = _checkpoint(tmp_path, kind)
    layout = "stability" if kind == "sd35" else "diffusers"
    cn = load_control_handle(write_tiny_sd3_controlnet(
        tmp_path / ("cn.safetensors" if layout == "stability" else "cn"), kind=kind, layout=layout))
    pixels = _hint_pixels()
    steps, cfg, seed, strength = 4, 4.5, 7, 0.8
    latent = torch.zeros(1, 16, 8, 8)
    noise = prepare_noise(latent, seed)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    pos, neg = clip.encode_text("a photo of a cat"), clip.encode_text("blurry")

    def run(positive, negative):
        out = sample(model.apply, model.sampling_schedule(), noise=noise, latent_image=latent, positive=positive,
                     negative=negative, cfg=cfg, sampler_name="euler", scheduler="simple", steps=steps, seed=seed,
                     sigmas=sched.sigmas.clone(), latent_format=model.latent_format)
        return vae.decode(out)[0].numpy()

    ours = run(*controlnet_apply_sd3(pos, neg, cn, vae, _image(pixels), strength, 0.0, 1.0))
    plain = run(pos, neg)

    m = _models(kind)
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=m["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=m["vae"],
        text_encoder=m["l"], tokenizer=load_tokenizer("l"), text_encoder_2=m["g"], tokenizer_2=load_tokenizer("g"),
        text_encoder_3=m["t5"], tokenizer_3=tiny_t5_tokenizer(), controlnet=tiny_sd3_controlnet(kind))
    ref = pipe("a photo of a cat", negative_prompt="blurry", control_image=PILImage.fromarray(pixels),
               controlnet_conditioning_scale=strength, num_inference_steps=steps, guidance_scale=cfg,
               latents=noise.clone(), height=64, width=64, max_sequence_length=77, output_type="np").images[0]
    assert ours.shape == ref.shape == (64, 64, 3)
    assert float(np.abs(ours - ref).max()) <= 1 / 255
    assert float(np.abs(ours - plain).max()) > 4 / 255   # the control does change the image


def test_strength_zero_and_inactive_ranges_equal_no_control(tmp_path):
    model, clip, vae = _checkpoint(tmp_path, "sd35")
    cn = load_control_handle(write_tiny_sd3_controlnet(tmp_path / "cn.safetensors"))
    pos, neg = clip.encode_text("a red house"), clip.encode_text("")
    image = _image(_hint_pixels())
    # the node passes the conditionings through at strength 0, as ComfyUI does
    out = controlnet_apply_sd3(pos, neg, cn, vae, image, 0.0, 0.0, 1.0)
    assert out[0] is pos and out[1] is neg
    latent = torch.zeros(1, 16, 8, 8)
    noise = prepare_noise(latent, 3)
    sigmas = torch.tensor([1.0, 0.5, 0.0])

    def run(p, n):
        return sample(model.apply, model.sampling_schedule(), noise=noise, latent_image=latent, positive=p,
                      negative=n, cfg=2.0, sampler_name="euler", scheduler="simple", steps=2, seed=3, sigmas=sigmas)

    def attach(app):
        return ([[c, {**o, "control": app}] for c, o in pos], [[c, {**o, "control": app}] for c, o in neg])

    plain = run(pos, neg)
    zero = cn.apply_hint(image, 0.0, (0.0, 1.0), vae=vae)
    assert torch.equal(run(*attach(zero)), plain)
    # start 0.9 with shift 3: active below sigma 0.25, so neither step (sigma 1, 0.5) is controlled
    late = cn.apply_hint(image, 1.0, (0.9, 1.0), vae=vae)
    assert torch.equal(run(*attach(late)), plain)
    full = cn.apply_hint(image, 1.0, (0.0, 1.0), vae=vae)
    assert float((run(*attach(full)) - plain).abs().max()) > 1e-3


def test_percent_range_on_the_flow_schedule_and_chained_controls_sum(tmp_path):
    model, clip, vae = _checkpoint(tmp_path, "sd35")
    cn = load_control_handle(write_tiny_sd3_controlnet(tmp_path / "a.safetensors", seed=1))
    other = load_control_handle(write_tiny_sd3_controlnet(tmp_path / "b.safetensors", seed=2))
    [[ctx, opts]] = clip.encode_text("a red house")
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    context, pooled = ctx.repeat(2, 1, 1), opts["pooled_output"].repeat(2, 1)
    image = _image(_hint_pixels())
    blocks = len(model.unet.transformer_blocks)

    def residuals(app, sigma):
        cond = {"sigma": torch.full((2,), sigma), "cond_or_uncond": [0, 1]}
        return app.block_residuals(model, x, t, context, pooled, cond)

    # start 0.5 -> sigma 0.75 under shift 3 (ComfyUI's percent_to_sigma of the flow schedule)
    windowed = cn.apply_hint(image, 1.0, (0.5, 1.0), vae=vae)
    assert residuals(windowed, 0.8) is None
    assert len(residuals(windowed, 0.7)) == blocks
    a = cn.apply_hint(image, 0.7, (0.0, 1.0), vae=vae)
    b = other.apply_hint(image, 1.3, (0.0, 1.0), vae=vae)
    chained = other.apply_hint(image, 1.3, (0.0, 1.0), previous=a, vae=vae)
    ra, rb, both = residuals(a, 0.5), residuals(b, 0.5), residuals(chained, 0.5)
    for p, q, s in zip(ra, rb, both):
        torch.testing.assert_close(s, p + q, rtol=0, atol=1e-6)
    # residuals scale with the strength (diffusers' conditioning_scale)
    double = residuals(cn.apply_hint(image, 1.4, (0.0, 1.0), vae=vae), 0.5)
    for p, d in zip(ra, double):
        torch.testing.assert_close(d, p * 2, rtol=1e-5, atol=1e-6)


def test_both_conditionings_get_the_control_and_the_vae_is_required(tmp_path):
    model, clip, vae = _checkpoint(tmp_path, "sd35")
    cn = load_control_handle(write_tiny_sd3_controlnet(tmp_path / "cn.safetensors"))
    pos, neg = clip.encode_text("a red house"), clip.encode_text("")
    image = _image(_hint_pixels())
    p, n = controlnet_apply_advanced(pos, neg, cn, image, 1.0, 0.0, 1.0, vae=vae)
    assert p[0][1]["control"] is n[0][1]["control"] and p[0][1]["control"].vae is vae
    assert "control" not in pos[0][1]
    with pytest.raises(ValueError, match=r"ControlNetApplyAdvanced: .*input 'vae'"):
        controlnet_apply_advanced(pos, neg, cn, image, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"ControlNetApply: .*`vae`"):
        controlnet_apply(pos, cn, image, 1.0)


def test_controls_of_the_other_family_are_clear_errors(tmp_path):
    model, clip, vae = _checkpoint(tmp_path, "sd35")
    cn = load_control_handle(write_tiny_sd3_controlnet(tmp_path / "cn.safetensors"))
    app = cn.apply_hint(_image(_hint_pixels()), 1.0, (0.0, 1.0), vae=vae)
    with pytest.raises(ValueError, match="SD3 ControlNet was applied to the conditioning of an SD1/SD2/SDXL model"):
        app.get_control(torch.zeros(1, 4, 8, 8), 500.0, {})
    [[ctx, opts]] = clip.encode_text("a")
    with pytest.raises(ValueError, match="SD3 models take SD3 ControlNets"):
        model.apply(torch.zeros(1, 16, 8, 8), 500.0, {"context": ctx, "pooled": opts["pooled_output"],
                                                       "control": {"down": [], "mid": None}})


def test_canny_and_depth_hints_are_preprocessed_by_control_type(tmp_path):
    model, _, vae = _checkpoint(tmp_path, "sd35")
    image = _image(_hint_pixels())
    x = torch.zeros(1, 16, 8, 8)
    for control_type, expect in ((1, image * 255 * 0.5 + 0.5), (2, 1.0 - image), (0, image)):
        cn = load_control_handle(write_tiny_sd3_controlnet(tmp_path / f"cn{control_type}.safetensors",
                                                           control_type=control_type))
        got = cn.apply_hint(image, 1.0, vae=vae).hint_latent(x, 1, model.latent_format)
        torch.testing.assert_close(preprocess_for(control_type)(image), expect)
        want = (vae.encode(expect) - 0.0609) * 1.5305
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bad_files_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "neither.safetensors"))
    with pytest.raises(ModelFileError, match=r"neither.safetensors.*not a ControlNet.*controlnet_blocks"):
        load_control_handle(tmp_path / "neither.safetensors")
    path = write_tiny_sd3_controlnet(tmp_path / "cut.safetensors")
    sd = load_file(str(path))
    del sd["transformer_blocks.1.mlp.fc1.weight"]
    save_file(sd, str(path))
    with pytest.raises(ModelFileError, match=r"SD3 ControlNet weights incomplete.*ff\.net\.0\.proj"):
        load_control_handle(path)
    folder = write_tiny_sd3_controlnet(tmp_path / "folder", layout="diffusers")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no diffusion_pytorch_model weights"):
        load_control_handle(folder)


def test_skip_layer_guidance_pass_gets_the_control_too(tmp_path):
    """SkipLayerGuidanceSD3's extra pass is a model call with the same conditioning: the ControlNet's
    residuals are added there as well."""
    from nodes.sd3_nodes import skip_layer_guidance_sd3

    model, clip, vae = _checkpoint(tmp_path, "sd35")
    cn = load_control_handle(write_tiny_sd3_controlnet(tmp_path / "cn.safetensors"))
    slg = skip_layer_guidance_sd3(model, "1", 3.0, 0.0, 1.0)
    [[ctx, opts]] = clip.encode_text("a red house")
    app = cn.apply_hint(_image(_hint_pixels()), 1.0, (0.0, 1.0), vae=vae)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, t = torch.tensor([0.6]), torch.tensor([600.0])
    cond = {"context": ctx, "pooled": opts["pooled_output"], "control": app, "sigma": sigma, "cond_or_uncond": [0]}
    out = slg.apply(x, t, cond)
    res = app.block_residuals(model, x, t, ctx, opts["pooled_output"], cond)
    tr = model.unet
    kw = {"timestep": t, "encoder_hidden_states": ctx, "pooled_projections": opts["pooled_output"],
          "block_controlnet_hidden_states": res}
    torch.testing.assert_close(out, tr(hidden_states=x, **kw).sample, rtol=0, atol=1e-6)
    want = 0.6 * (tr(hidden_states=x, skip_layers=[1], **kw).sample - out)
    torch.testing.assert_close(slg.skip_layer_guidance._local.diff, want, rtol=0, atol=1e-6)
