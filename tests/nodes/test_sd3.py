"""SD3 / SD3.5: tiny random-weight checkpoints in the real single-file layout, loaded by the real loader,
against diffusers' StableDiffusion3Pipeline on the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nodes.models import sd3
from nodes.models.sd3_handles import SD3ClipHandle, SD3ModelHandle
from nodes.models.state_dict import ModelFileError
from nodes.models.tiny_sd3 import tiny_sd3_models, tiny_t5_tokenizer, write_tiny_sd3_checkpoint, write_tiny_sd3_encoders
from nodes.models.tokenizer import load_tokenizer
from nodes.models.vae import VaeHandle
from nodes.sampling.sample import prepare_noise, sample

VARIANTS = [pytest.param(False, id="sd3-medium"), pytest.param(True, id="sd35-mmditx")]
# diffusers' fixed sin-cos position table (a persistent buffer, not a trained weight): it is recomputed by
# every construction, and two builds in one process can differ in the last float32 bit of a few entries.
POS_EMBED = "pos_embed.pos_embed"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    out = {}
    for sd35 in (False, True):
        name = "sd35" if sd35 else "sd3"
        out[name] = write_tiny_sd3_checkpoint(root / f"tiny_{name}_incl_clips_t5.safetensors", sd35=sd35)
        out[name + "_bare"] = write_tiny_sd3_checkpoint(root / f"tiny_{name}.safetensors", sd35=sd35,
                                                        with_encoders=False, dtype=torch.float16)
    out["encoders"] = write_tiny_sd3_encoders(root / "text_encoders")
    out["encoders_fp16"] = write_tiny_sd3_encoders(root / "text_encoders", dtype=torch.float16)
    return out


def _pipeline(models, tok_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=models["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=models["vae"],
        text_encoder=models["l"], tokenizer=load_tokenizer("l"), text_encoder_2=models["g"],
        tokenizer_2=load_tokenizer("g"), text_encoder_3=models["t5"], tokenizer_3=tok_t5)


@pytest.mark.parametrize("sd35", VARIANTS)
def test_single_file_loads_into_the_diffusers_models(files, sd35):
    name = "sd35" if sd35 else "sd3"
    ck = sd3.load_sd3_checkpoint(files[name])
    ref = tiny_sd3_models(sd35=sd35)
    assert ck.variant == name and sorted(ck.text_encoders) == ["g", "l", "t5"]
    assert list(ck.transformer_config["dual_attention_layers"]) == ([0, 1] if sd35 else [])
    for key, model in (("transformer", ck.transformer), ("vae", ck.vae), *ck.text_encoders.items()):
        got, want = model.state_dict(), ref[key].state_dict()
        assert set(want) <= set(got), key
        for k, v in want.items():
            if k == POS_EMBED:
                torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got[k], v), f"{key}: {k}"
    assert ck.vae.config.latent_channels == 16 and ck.vae.config.shift_factor == pytest.approx(0.0609)
    # component outputs equal the reference models' on the same input
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 20, 128, generator=torch.Generator().manual_seed(2))
    pooled = torch.randn(1, 96, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0])
    a = ck.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    b = ref["transformer"](hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bare_checkpoint_and_separate_encoders(files):
    ck = sd3.load_sd3_checkpoint(files["sd3_bare"])
    assert ck.text_encoders == {} and ck.transformer is not None
    with pytest.raises(ModelFileError, match="TripleCLIPLoader"):
        sd3.load_sd3_checkpoint(files["sd3_bare"], require_clip=True)
    ref = tiny_sd3_models()
    for enc in ("encoders", "encoders_fp16"):
        for kind, path in files[enc].items():
            got_kind, model = sd3.load_text_encoder_file(path)
            assert got_kind == kind
            for k, v in ref[kind].state_dict().items():
                if k in model.state_dict():
                    torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=2e-3 if "fp16" in enc else 0)
    with pytest.raises(ModelFileError, match="expected a t5xxl text encoder, the file holds clip_l"):
        sd3.load_text_encoder_file(files["encoders"]["l"], expect="t5")


def test_fp8_scaled_weights_are_dequantised(tmp_path):
    from safetensors.torch import save_file

    ref = tiny_sd3_models()["t5"]
    sd = {k: v.clone() for k, v in sd3.encoder_state_dict("t5", ref).items()}
    name = "encoder.block.0.layer.1.DenseReluDense.wi_0"
    w = sd[name + ".weight"]
    scale = w.abs().max() / 448.0
    sd[name + ".weight"] = (w / scale).to(torch.float8_e4m3fn)
    sd[name + ".scale_weight"] = scale.reshape(1)
    sd["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    kind, model = sd3.load_text_encoder_file(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", expect="t5")
    got = model.state_dict()[name + ".weight"]
    assert kind == "t5" and (got - w).abs().max() <= 0.07 * w.abs().max()


def _sdflow(ck, tok_t5):
    clip = SD3ClipHandle(ck.text_encoders, {"l": load_tokenizer("l"), "g": load_tokenizer("g"), "t5": tok_t5},
                         device="cpu")
    return SD3ModelHandle(ck.transformer, ck.variant, device="cpu"), clip, VaeHandle(ck.vae, device="cpu")


@pytest.mark.parametrize("sd35", VARIANTS)
def test_prompt_encoding_matches_the_pipeline(files, sd35):
    name = "sd35" if sd35 else "sd3"
    ck = sd3.load_sd3_checkpoint(files[name])
    tok = tiny_t5_tokenizer()
    _, clip, _ = _sdflow(ck, tok)
    pipe = _pipeline(tiny_sd3_models(sd35=sd35), tok)
    prompt = "a photo of a red cat"
    want, _, want_pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                 max_sequence_length=77)
    [[cond, opts]] = clip.encode_text(prompt)
    assert cond.shape == want.shape == (1, 154, 128)
    torch.testing.assert_close(cond, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(opts["pooled_output"], want_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sd35", VARIANTS)
def test_txt2img_matches_the_diffusers_pipeline(files, sd35):
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = "sd35" if sd35 else "sd3"
    ck = sd3.load_sd3_checkpoint(files[name])
    tok = tiny_t5_tokenizer()
    model, clip, vae = _sdflow(ck, tok)
    steps, cfg, seed = 4, 4.5, 7
    latent = torch.zeros(1, 16, 8, 8)
    noise = prepare_noise(latent, seed)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    out = sample(model.apply, model.sampling_schedule(), noise=noise, latent_image=latent,
                 positive=clip.encode_text("a photo of a cat"), negative=clip.encode_text("blurry"),
                 cfg=cfg, sampler_name="euler", scheduler="simple", steps=steps, seed=seed,
                 sigmas=sched.sigmas.clone(), latent_format=model.latent_format)
    ours = vae.decode(out)[0].numpy()   # raw latents out: (x / 1.5305) + 0.0609, as the pipeline decodes
    pipe = _pipeline(tiny_sd3_models(sd35=sd35), tok)
    ref = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=cfg,
               latents=noise.clone(), height=64, width=64, max_sequence_length=77, output_type="np").images[0]
    assert ours.shape == ref.shape == (64, 64, 3) and float(ours.std()) > 0.01
    assert float(np.abs(ours - ref).max()) <= 1 / 255


def test_ksampler_runs_every_sampler_family_over_flow_sigmas_with_16_channel_previews(files):
    """KSampler's samplers and schedulers on the flow schedule; previews of the 16-channel x0."""
    from nodes.sampling.preview import latent_to_rgb_tensor

    ck = sd3.load_sd3_checkpoint(files["sd35"])
    model, clip, _ = _sdflow(ck, tiny_t5_tokenizer())
    pos, neg = clip.encode_text("a red house"), clip.encode_text("")
    latent = torch.zeros(1, 16, 8, 8)
    previews = []
    results = {}
    for sampler, scheduler in (("euler", "simple"), ("dpmpp_2m", "sgm_uniform"), ("euler_ancestral", "normal"),
                               ("uni_pc", "beta"), ("dpmpp_2m_sde", "karras"), ("heun", "exponential")):
        out = sample(model.apply, model.sampling_schedule(), noise=prepare_noise(latent, 3), latent_image=latent,
                     positive=pos, negative=neg, cfg=3.0, sampler_name=sampler, scheduler=scheduler, steps=3, seed=3,
                     callback=lambda i, n, x0: previews.append(latent_to_rgb_tensor(x0, "sd3")))
        assert torch.isfinite(out).all() and out.shape == latent.shape, (sampler, scheduler)
        results[sampler] = out
    assert previews and all(p.shape == (8, 8, 3) for p in previews)
    assert not torch.equal(results["euler"], results["dpmpp_2m"])
    # the flow schedule starts from pure noise: sigma_max is 1
    assert float(model.sampling_schedule().sigma_max) == pytest.approx(1.0)


def test_skip_layer_guidance_matches_its_definition(files):
    """SkipLayerGuidanceSD3: inside its sigma window the result is cfg + (cond - cond_skipped) * scale;
    outside it, plain CFG."""
    from nodes.sd3_nodes import skip_layer_guidance_sd3

    ck = sd3.load_sd3_checkpoint(files["sd35"])
    model, clip, _ = _sdflow(ck, tiny_t5_tokenizer())
    pos, neg = clip.encode_text("a red house"), clip.encode_text("")
    latent = torch.zeros(1, 16, 8, 8)
    noise = prepare_noise(latent, 5)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    slg = skip_layer_guidance_sd3(model, "1", 3.0, 0.4, 1.0)  # the second step only (sigma 0.5)
    assert slg.skip_layer_guidance.active(0.5) and not slg.skip_layer_guidance.active(1.0)

    def run(m):
        return sample(m.apply, m.sampling_schedule(), noise=noise, latent_image=latent, positive=pos, negative=neg,
                      cfg=2.0, sampler_name="euler", scheduler="simple", steps=2, seed=5, sigmas=sigmas,
                      patches=dict(m.sampling_patches))

    plain, guided = run(model), run(slg)
    # by hand: euler from sigma 1 to 0.5 is unguided by SLG; the last step adds the SLG term
    ctx = {k: torch.cat([p[0][0], n[0][0]]) for k, p, n in [("c", pos, neg)]}["c"]
    pooled = torch.cat([pos[0][1]["pooled_output"], neg[0][1]["pooled_output"]])
    tr = ck.transformer

    def v(x, s, skip=None):
        kw = {"skip_layers": skip} if skip else {}
        return tr(hidden_states=x.repeat(2, 1, 1, 1), timestep=torch.full((2,), s * 1000.0),
                  encoder_hidden_states=ctx, pooled_projections=pooled, **kw).sample

    x = noise.clone()
    for s, s_next in ((1.0, 0.5), (0.5, 0.0)):
        out = v(x, s)
        den_c, den_u = x - out[:1] * s, x - out[1:] * s
        den = den_u + (den_c - den_u) * 2.0
        if s == 0.5:
            skipped = tr(hidden_states=x, timestep=torch.full((1,), 500.0), encoder_hidden_states=ctx[:1],
                         pooled_projections=pooled[:1], skip_layers=[1]).sample
            den = den + (den_c - (x - skipped * s)) * 3.0
        x = x + (x - den) / s * (s_next - s)
    torch.testing.assert_close(guided, x, rtol=0, atol=1e-4)
    assert float((guided - plain).abs().max()) > 1e-3


def test_t5_file_of_the_wrong_dtype_is_named_with_what_was_expected(tmp_path):
    from safetensors.torch import save_file

    sd = {k: (v * 100).to(torch.int8) for k, v in sd3.encoder_state_dict("t5", tiny_sd3_models()["t5"]).items()}
    save_file(sd, str(tmp_path / "t5xxl_int8.safetensors"))
    with pytest.raises(ModelFileError, match=r"t5xxl weights stored as torch.int8; expected float"):
        sd3.load_text_encoder_file(tmp_path / "t5xxl_int8.safetensors", expect="t5")
