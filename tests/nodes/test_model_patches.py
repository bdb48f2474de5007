"""Model-patch nodes: schedule overrides against diffusers' and the papers' formulas, CFG patches by their
algebra, FreeU's UNet hooks, Perp-Neg and Differential Diffusion, on the tiny SD1 checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from nodes import custom_sampling as cs, model_patches as mp
from nodes.conditioning import clip_text_encode
from nodes.latent import empty_latent_image
from nodes.loaders import checkpoint_loader_simple
from nodes.sampler_nodes import ksampler
from nodes.sampling.model_sampling import DiscreteSchedule, LCMSchedule

from .conftest import TINY_SD1

SEED = 99


@pytest.fixture(scope="module")
def loaded(sd_env):
    from .conftest import activate

    activate(sd_env)
    model, clip, _ = checkpoint_loader_simple(TINY_SD1)
    pos = clip_text_encode("a lighthouse at dusk", clip)
    neg = clip_text_encode("fog", clip)
    empty = clip_text_encode("", clip)
    return model, pos, neg, empty, empty_latent_image(64, 64, 1)


def _diff(a, b) -> float:
    # measured in model space (SD1's 0.18215): LATENTs hold raw VAE latents, ~5x larger
    return float((a["samples"] - b["samples"]).abs().max()) * 0.18215


# ------------------------------------------------------------------------------------------ ModelSampling*

def test_model_sampling_discrete_eps_is_the_checkpoint_default(loaded):
    model, pos, neg, _, latent = loaded
    patched = mp.model_sampling_discrete(model, "eps", False)
    assert model.model_sampling is None and patched.model_sampling.prediction_type == "epsilon"
    assert _diff(ksampler(patched, SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0),
                 ksampler(model, SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0)) == 0
    v = mp.model_sampling_discrete(model, "v_prediction", False)
    assert _diff(ksampler(v, SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0),
                 ksampler(model, SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0)) > 1e-3
    x0 = mp.model_sampling_discrete(model, "x0", False).model_sampling
    out = torch.randn(1, 4, 8, 8)
    assert torch.equal(x0.calculate_denoised(torch.tensor([3.0]), out, torch.zeros_like(out)), out)


def test_zsnr_matches_diffusers_rescale(loaded):
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    zsnr = mp.model_sampling_discrete(loaded[0], "v_prediction", True).model_sampling
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    ref = ((1 - abar) / abar) ** 0.5
    # diffusers' last alpha_bar is exactly 0 (infinite sigma); the ComfyUI form keeps 4.897e-8 there
    torch.testing.assert_close(zsnr.sigmas[:-1].double(), ref[:-1], rtol=1e-4, atol=0)
    last_alpha_bar = 4.8973451890853435e-08
    assert float(zsnr.sigmas[-1]) == pytest.approx(math.sqrt((1 - last_alpha_bar) / last_alpha_bar), rel=1e-5)
    assert float(zsnr.sigmas[0]) == pytest.approx(float(DiscreteSchedule().sigmas[0]), rel=1e-5)


def test_lcm_schedule_against_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler

    lcm = LCMSchedule()
    full = DiscreteSchedule()
    assert lcm.num_timesteps == 50
    ts = torch.arange(19, 1000, 20)
    torch.testing.assert_close(lcm.sigmas, full.sigmas[ts], rtol=1e-5, atol=0)
    # timesteps snap to the distilled ones, sigma(t) inverts it
    assert lcm.timestep(full.sigmas[500:501]).tolist() == [499.0]
    assert lcm.timestep(lcm.sigma(torch.tensor([999.0, 519.0]))).tolist() == [999.0, 519.0]
    # consistency boundary conditions: the same c_skip/c_out as diffusers' LCMScheduler
    ref = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sigma = lcm.sigmas[10:11]
    t = int(lcm.timestep(sigma))
    c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
    eps, x = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    expected = c_out * (x - eps * sigma) + c_skip * x
    torch.testing.assert_close(lcm.calculate_denoised(sigma, eps, x), expected.float())


def test_lcm_workflow_samples_on_the_distilled_timesteps(loaded):
    model, pos, neg, _, latent = loaded
    lcm = mp.model_sampling_discrete(model, "lcm", False)
    sigmas = cs.basic_scheduler(lcm, "sgm_uniform", 4, 1.0)
    # the UNet only ever sees the distilled timesteps 19, 39, ..., 999
    seen = lcm.model_sampling.timestep(sigmas[:-1]).tolist()
    assert seen[0] == 999 and all(t % 20 == 19 for t in seen) and seen == sorted(seen, reverse=True)
    out = ksampler(lcm, SEED, 4, 1.0, "lcm", "sgm_uniform", pos, neg, latent, 1.0)
    assert torch.isfinite(out["samples"]).all()
    assert _diff(out, ksampler(model, SEED, 4, 1.0, "lcm", "sgm_uniform", pos, neg, latent, 1.0)) > 1e-3


def test_continuous_edm_follows_karras_preconditioning(loaded):
    model, pos, neg, _, latent = loaded
    edm = mp.model_sampling_continuous_edm(model, "edm", 120.0, 0.002).model_sampling
    assert float(edm.sigma_min) == pytest.approx(0.002) and float(edm.sigma_max) == pytest.approx(120.0)
    sigma = torch.tensor([2.5])
    assert float(edm.timestep(sigma)) == pytest.approx(0.25 * math.log(2.5))
    assert float(edm.sigma(edm.timestep(sigma))) == pytest.approx(2.5, rel=1e-6)
    f, x, sd = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), 0.5
    c_skip = sd**2 / (2.5**2 + sd**2)
    c_out = 2.5 * sd / math.sqrt(2.5**2 + sd**2)
    torch.testing.assert_close(edm.calculate_denoised(sigma, f, x), c_skip * x + c_out * f)
    torch.testing.assert_close(edm.calculate_input(sigma, x), x / math.sqrt(2.5**2 + sd**2))
    assert edm.percent_to_sigma(0.5) == pytest.approx(math.sqrt(120.0 * 0.002))
    patched = mp.model_sampling_continuous_edm(model, "v_prediction", 120.0, 0.002)
    out = ksampler(patched, SEED, 3, 3.0, "euler", "karras", pos, neg, latent, 1.0)
    assert torch.isfinite(out["samples"]).all()
    with pytest.raises(ValueError, match="ModelSamplingContinuousEDM: input 'sigma_max'"):
        mp.model_sampling_continuous_edm(model, "edm", 0.001, 0.002)


# ------------------------------------------------------------------------------------------ RescaleCFG

def test_rescale_cfg_against_the_paper_in_v_space():
    torch.manual_seed(0)
    x, cond, uncond = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma, scale, phi = torch.tensor([3.0, 0.7]), 6.0, 0.7
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sig_vp = 1 / torch.sqrt(1 + s * s), s / torch.sqrt(1 + s * s)   # VP coefficients
    x_vp = x * alpha

    def to_v(x0):  # v = alpha eps - sigma x0 (Salimans & Ho 2022), eps = (x - x0) / sigma
        return alpha * (x - x0) / s - sig_vp * x0

    v_pos, v_neg = to_v(cond), to_v(uncond)
    v_cfg = v_neg + scale * (v_pos - v_neg)
    def std(t):
        return t.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)

    v = phi * v_cfg * std(v_pos) / std(v_cfg) + (1 - phi) * v_cfg   # Lin et al. 2023, Alg. 2
    expected = alpha * x_vp - sig_vp * v
    torch.testing.assert_close(mp.rescale_cfg(cond, uncond, scale, x, sigma, phi), expected)
    # multiplier 0 is plain CFG
    torch.testing.assert_close(mp.rescale_cfg(cond, uncond, scale, x, sigma, 0.0), uncond + scale * (cond - uncond))


def test_rescale_cfg_node_patches_sampling(loaded):
    model, pos, neg, _, latent = loaded
    plain = ksampler(model, SEED, 3, 7.0, "euler", "normal", pos, neg, latent, 1.0)
    assert _diff(ksampler(mp.rescale_cfg_node(model, 0.0), SEED, 3, 7.0, "euler", "normal", pos, neg, latent, 1.0),
                 plain) < 1e-4
    rescaled = ksampler(mp.rescale_cfg_node(model, 0.7), SEED, 3, 7.0, "euler", "normal", pos, neg, latent, 1.0)
    assert _diff(rescaled, plain) > 1e-3
    assert model.sampling_patches == {}


# ------------------------------------------------------------------------------------------ FreeU

def test_fourier_filter():
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(mp.fourier_filter(x, 1, 1.0), x, atol=1e-5, rtol=0)
    flat = torch.full((1, 2, 8, 8), 3.0)
    assert mp.fourier_filter(flat, 1, 0.0).abs().max() < 1e-5   # only the DC term, removed
    assert mp.fourier_filter(flat, 1, 0.5).mean() == pytest.approx(1.5, rel=1e-5)


def _apply(model, x, t, cond):
    with model.output_block_hooks():
        return model.apply(x, t, cond)


def test_freeu_hooks_split_the_skip_concat_and_leave_no_trace(loaded):
    model = loaded[0]
    unet = model.unet
    x = torch.randn(1, 4, 8, 8)
    cond = {"context": loaded[1][0][0]}
    t = torch.tensor([500.0])
    plain = model.apply(x, t, cond)
    seen: list[tuple[int, int]] = []

    def spy(h, skip):
        seen.append((h.shape[1], skip.shape[1]))
        return h, skip

    spied = model.with_patches(output_block_patches=(spy,))
    torch.testing.assert_close(_apply(spied, x, t, cond), plain)
    resnets = [r for b in unet.up_blocks for r in b.resnets]
    # one call per up-block resnet, splitting its input into the backbone h and the skip features;
    # after the first resnet of a block, h has the block's own width
    assert [h + s for h, s in seen] == [int(r.in_channels) for r in resnets]
    firsts = {id(b.resnets[0]) for b in unet.up_blocks}
    assert all(h == int(r.out_channels) for (h, _), r in zip(seen, resnets) if id(r) not in firsts)
    # identity settings change nothing; the defaults change the prediction; the original stays clean
    torch.testing.assert_close(_apply(mp.freeu(model, 1.0, 1.0, 1.0, 1.0), x, t, cond), plain, atol=1e-5, rtol=0)
    base = int(unet.config.block_out_channels[0])
    assert any(h in (base * 2, base * 4) for h, _ in seen), "the tiny UNet has no FreeU stage"
    for patched in (mp.freeu(model, 1.1, 1.2, 0.9, 0.2), mp.freeu_v2(model, 1.3, 1.4, 0.9, 0.2)):
        assert float((_apply(patched, x, t, cond) - plain).abs().max()) > 1e-4
        # outside a sampling run (the hooks' context) the patched handle predicts like the original
        torch.testing.assert_close(patched.apply(x, t, cond), plain)
    torch.testing.assert_close(_apply(model, x, t, cond), plain)
    assert all(not r._forward_pre_hooks for r in resnets)


def test_freeu_changes_ksampler_output(loaded):
    model, pos, neg, _, latent = loaded
    plain = ksampler(model, SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0)
    assert _diff(ksampler(mp.freeu_v2(model, 1.3, 1.4, 0.9, 0.2), SEED, 3, 4.0, "euler", "normal", pos, neg, latent,
                          1.0), plain) > 1e-4
    assert _diff(ksampler(mp.freeu(model, 1.0, 1.0, 1.0, 1.0), SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0),
                 plain) < 1e-4
    assert all(not r._forward_pre_hooks for b in model.unet.up_blocks for r in b.resnets)


# ------------------------------------------------------------------------------------------ Perp-Neg

def test_perp_neg_algebra():
    empty = torch.zeros(1, 2, 2, 2)
    pos = torch.ones(1, 2, 2, 2)
    parallel = 3 * pos
    torch.testing.assert_close(mp.perp_neg(pos, parallel, empty, 1.0, 5.0), empty + 5.0 * pos)
    ortho = pos.clone()
    ortho[:, 1] = -1
    torch.testing.assert_close(mp.perp_neg(pos, ortho, empty, 0.5, 2.0), 2.0 * (pos - 0.5 * ortho))


def test_perp_neg_guider_and_patch_reduce_to_cfg_against_empty(loaded):
    model, pos, neg, empty, latent = loaded
    sigmas = cs.basic_scheduler(model, "normal", 3, 1.0)
    sampler, noise = cs.ksampler_select("euler"), cs.random_noise(SEED)

    def run(guider):
        return cs.sampler_custom_advanced(noise, guider, sampler, sigmas, latent).output

    ref = run(cs.cfg_guider(model, pos, empty, 4.0))
    assert _diff(run(mp.perp_neg_guider(model, pos, neg, empty, 4.0, 0.0)), ref) < 1e-4
    assert _diff(run(mp.perp_neg_guider(model, pos, neg, empty, 4.0, 1.0)), ref) > 1e-4
    patched = mp.perp_neg_node(model, empty, 0.0)
    assert _diff(ksampler(patched, SEED, 3, 4.0, "euler", "normal", pos, neg, latent, 1.0),
                 ksampler(model, SEED, 3, 4.0, "euler", "normal", pos, empty, latent, 1.0)) < 1e-4


# ------------------------------------------------------------------------------------------ DifferentialDiffusion

def test_differential_diffusion_mask_schedule(loaded):
    model = loaded[0]
    fn = mp.differential_diffusion(model, 1.0).sampling_patches["denoise_mask_function"]
    schedule = model.sampling_schedule()
    steps = cs.basic_scheduler(model, "normal", 10, 1.0)
    mask = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11)
    first = fn(steps[:1], mask, steps)
    assert first.tolist()[0][0][0] == [0.0] * 10 + [1.0]          # only fully masked pixels at the start
    last = fn(torch.tensor([float(schedule.sigma_min)]), mask, steps)
    assert last.tolist()[0][0][0] == [1.0] * 11                    # everything by the end
    mid = fn(steps[5:6], mask, steps)
    assert 2 <= int(mid.sum()) <= 9
    half = mp.differential_diffusion(model, 0.5).sampling_patches["denoise_mask_function"](steps[:1], mask, steps)
    torch.testing.assert_close(half, 0.5 * first + 0.5 * mask)


def test_differential_diffusion_inpaints_a_soft_mask(loaded):
    model, pos, neg, _, _ = loaded
    torch.manual_seed(3)
    latent = {"samples": torch.randn(1, 4, 8, 8),
              "noise_mask": torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)}
    plain = ksampler(model, SEED, 4, 4.0, "euler", "simple", pos, neg, latent, 1.0)
    diff = ksampler(mp.differential_diffusion(model), SEED, 4, 4.0, "euler", "simple", pos, neg, latent, 1.0)
    assert torch.isfinite(diff["samples"]).all() and _diff(diff, plain) > 1e-3
    # pixels the last step's threshold keeps are exactly the original, the others are fully regenerated
    steps = cs.basic_scheduler(model, "simple", 4, 1.0)  # ends above sigma_min
    fn = mp.differential_diffusion(model).sampling_patches["denoise_mask_function"]
    final = fn(steps[-2:-1], latent["noise_mask"].expand(1, 4, 8, 8), steps)
    kept = final == 0
    assert kept.any() and (~kept).any()
    # exact up to the float rounding of the latent format's scale in and out (ComfyUI's the same)
    torch.testing.assert_close(diff["samples"][kept], latent["samples"][kept], rtol=1e-6, atol=1e-6)
    soft = latent["noise_mask"].expand(1, 4, 8, 8)
    assert not torch.allclose(diff["samples"][~kept], (diff["samples"] * soft + latent["samples"] * (1 - soft))[~kept])


# ------------------------------------------------------------------------------------------ InstructPix2Pix

def test_instruct_pix_to_pix_conditioning(sd_env, loaded):
    from nodes.instructpix2pix import instruct_pix_to_pix_conditioning

    _, pos, neg, _, _ = loaded
    _, _, vae = checkpoint_loader_simple(TINY_SD1)
    pixels = torch.rand(1, 70, 66, 3)
    out = instruct_pix_to_pix_conditioning(pos, neg, vae, pixels)
    expected = vae.encode(pixels[:, 3:67, 1:65])   # centred crop to 64x64
    for cond, original in ((out.positive, pos), (out.negative, neg)):
        assert len(cond) == len(original) and cond[0][0] is original[0][0]
        torch.testing.assert_close(cond[0][1]["concat_latent_image"], expected)
        assert "concat_latent_image" not in original[0][1]
    assert out.latent["samples"].shape == expected.shape and not out.latent["samples"].any()
    info = sd_env[0].object_info()["InstructPixToPixConditioning"]
    assert list(info["input"]["required"]) == ["positive", "negative", "vae", "pixels"]
    assert info["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]
    assert info["output_name"] == ["positive", "negative", "latent"]
    with pytest.raises(ValueError, match="InstructPixToPixConditioning: input 'pixels'"):
        instruct_pix_to_pix_conditioning(pos, neg, vae, torch.rand(1, 4, 4, 3))
