"""Custom sampling nodes: schemas as ComfyUI's, schedules against independent formulas, samplers that
reproduce KSampler exactly, guiders by their algebra, and clear errors for bad input."""
from __future__ import annotations

import math

import pytest
import torch

from engine.executor import Executor
from nodes import custom_sampling as cs
from nodes.conditioning import clip_text_encode
from nodes.latent import empty_latent_image
from nodes.loaders import checkpoint_loader_simple
from nodes.sampler_nodes import ksampler

from .conftest import TINY_SD1

SEED = 1234


@pytest.fixture(scope="module")
def loaded(sd_env):
    from .conftest import activate

    activate(sd_env)
    model, clip, _vae = checkpoint_loader_simple(TINY_SD1)
    pos = clip_text_encode("a red fox in the snow", clip)
    neg = clip_text_encode("blurry", clip)
    other = clip_text_encode("a watercolor painting", clip)
    latent = empty_latent_image(64, 64, 2)
    return model, pos, neg, other, latent


def _close(a, b, tol=1e-5):
    a, b = a["samples"] if isinstance(a, dict) else a, b["samples"] if isinstance(b, dict) else b
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


# ------------------------------------------------------------------------------------------ schemas

def test_object_info_matches_comfyui_schema(sd_env):
    registry, _ = sd_env
    info = registry.object_info()
    sc = info["SamplerCustom"]
    assert list(sc["input"]["required"]) == ["model", "add_noise", "noise_seed", "cfg", "positive", "negative",
                                             "sampler", "sigmas", "latent_image"]
    assert sc["output"] == ["LATENT", "LATENT"] and sc["output_name"] == ["output", "denoised_output"]
    adv = info["SamplerCustomAdvanced"]
    assert list(adv["input"]["required"]) == ["noise", "guider", "sampler", "sigmas", "latent_image"]
    assert info["KSamplerSelect"]["output"] == ["SAMPLER"]
    assert (info["KSamplerSelect"]["input"]["required"]["sampler_name"][0]
            == info["KSampler"]["input"]["required"]["sampler_name"][0])
    bs = info["BasicScheduler"]["input"]["required"]
    assert list(bs) == ["model", "scheduler", "steps", "denoise"]
    assert bs["steps"][1] == {"default": 20, "min": 1, "max": 10000}
    assert info["SDTurboScheduler"]["input"]["required"]["steps"][1] == {"default": 1, "min": 1, "max": 10}
    assert info["AlignYourStepsScheduler"]["input"]["required"]["model_type"][0] == ["SD1", "SDXL", "SVD"]
    assert info["AlignYourStepsScheduler"]["input"]["required"]["steps"][1]["default"] == 10
    assert info["KarrasScheduler"]["input"]["required"]["sigma_max"][1]["default"] == 14.614642
    assert info["SetFirstSigma"]["input"]["required"]["sigma"][1]["default"] == 136.0
    for name in ("SplitSigmas", "SplitSigmasDenoise"):
        assert info[name]["output"] == ["SIGMAS", "SIGMAS"]
        assert info[name]["output_name"] == ["high_sigmas", "low_sigmas"]
    assert list(info["DualCFGGuider"]["input"]["required"]) == ["model", "cond1", "cond2", "negative", "cfg_conds",
                                                                 "cfg_cond2_negative", "style"]
    assert info["RandomNoise"]["input"]["required"]["noise_seed"][1]["control_after_generate"] is True
    assert info["DisableNoise"]["input"]["required"] == {} and info["DisableNoise"]["output"] == ["NOISE"]
    for name in ("BasicGuider", "CFGGuider", "DualCFGGuider"):
        assert info[name]["output"] == ["GUIDER"]


# ------------------------------------------------------------------------------------------ schedules

def test_model_free_schedules_match_their_formulas():
    n, hi, lo = 7, 14.614642, 0.0291675
    ramp = [i / (n - 1) for i in range(n)]
    karras = [(hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 for r in ramp] + [0.0]
    torch.testing.assert_close(cs.karras_scheduler(n, hi, lo, 7.0), torch.tensor(karras), rtol=1e-5, atol=0)
    expo = [math.exp(math.log(hi) + r * (math.log(lo) - math.log(hi))) for r in ramp] + [0.0]
    torch.testing.assert_close(cs.exponential_scheduler(n, hi, lo), torch.tensor(expo), rtol=1e-5, atol=0)
    # rho 1 is the exponential schedule; rho 2 bends towards sigma_max
    torch.testing.assert_close(cs.polyexponential_scheduler(n, hi, lo, 1.0), torch.tensor(expo), rtol=1e-5, atol=0)
    poly2 = [math.exp((1 - r) ** 2 * (math.log(hi) - math.log(lo)) + math.log(lo)) for r in ramp] + [0.0]
    torch.testing.assert_close(cs.polyexponential_scheduler(n, hi, lo, 2.0), torch.tensor(poly2), rtol=1e-5, atol=0)


def test_align_your_steps_uses_the_published_levels():
    from nodes.sampling.schedulers import AYS_NOISE_LEVELS

    ten = cs.align_your_steps_scheduler("SD1", 10, 1.0)
    assert ten.tolist()[:-1] == pytest.approx(AYS_NOISE_LEVELS["SD1"][:-1], rel=1e-6) and ten[-1] == 0
    twenty = cs.align_your_steps_scheduler("SDXL", 20, 1.0)
    assert len(twenty) == 21 and twenty[0] == pytest.approx(14.6146412293) and twenty[-1] == 0
    # log-linear interpolation: every second level of the 20-step schedule is a published one
    assert twenty[2:-1:2].tolist() == pytest.approx(AYS_NOISE_LEVELS["SDXL"][1:-1], rel=1e-5)
    assert torch.all(twenty[:-1] > twenty[1:])
    half = cs.align_your_steps_scheduler("SD1", 10, 0.5)
    assert half.tolist()[:-1] == pytest.approx(AYS_NOISE_LEVELS["SD1"][5:-1], rel=1e-6) and len(half) == 6
    assert cs.align_your_steps_scheduler("SD1", 10, 0.0).numel() == 0


def test_sd_turbo_and_basic_scheduler(loaded):
    model = loaded[0]
    table = model.sampling_schedule().sigmas
    one = cs.sd_turbo_scheduler(model, 1, 1.0)
    assert one.tolist() == pytest.approx([float(table[999]), 0.0])
    four = cs.sd_turbo_scheduler(model, 4, 1.0)
    assert four.tolist() == pytest.approx([float(table[t]) for t in (999, 899, 799, 699)] + [0.0])
    half = cs.sd_turbo_scheduler(model, 2, 0.5)
    assert half.tolist() == pytest.approx([float(table[499]), float(table[399]), 0.0])

    from nodes.sampling import sigmas_for

    full = cs.basic_scheduler(model, "karras", 8, 1.0)
    torch.testing.assert_close(full, sigmas_for(model.sampling_schedule(), "euler", "karras", 8, 1.0).float())
    part = cs.basic_scheduler(model, "normal", 4, 0.5)
    torch.testing.assert_close(part, cs.basic_scheduler(model, "normal", 8, 1.0)[-5:])
    assert cs.basic_scheduler(model, "normal", 4, 0.0).numel() == 0
    beta = cs.beta_sampling_scheduler(model, 10, 0.6, 0.6)
    torch.testing.assert_close(beta, cs.basic_scheduler(model, "beta", 10, 1.0))


def test_sigma_surgery():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    high, low = cs.split_sigmas(s, 2)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = cs.split_sigmas(s, 100)
    assert high.tolist() == s.tolist() and low.numel() == 0
    high, low = cs.split_sigmas_denoise(s, 0.5)  # 4 steps, the last 2 in low; both share sigma 2
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = cs.split_sigmas_denoise(s, 0.0)
    assert high.numel() == 0 and low.tolist() == [0.0]
    flipped = cs.flip_sigmas(s)
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 5.0, 10.0]) and s[-1] == 0  # input untouched
    assert cs.flip_sigmas(torch.zeros(0)).numel() == 0
    first = cs.set_first_sigma(s, 136.0)
    assert first.tolist() == [136.0, 5.0, 2.0, 1.0, 0.0] and s[0] == 10.0


@pytest.mark.parametrize("call, words", [
    (lambda: cs.set_first_sigma(torch.zeros(0), 1.0), ["SetFirstSigma", "'sigmas'", "empty"]),
    (lambda: cs.flip_sigmas(torch.tensor([1.0, float("nan")])), ["FlipSigmas", "'sigmas'", "non-finite"]),
    (lambda: cs.split_sigmas(torch.ones(2, 2), 0), ["SplitSigmas", "'sigmas'", "1-D"]),
    (lambda: cs.exponential_scheduler(10, 14.6, 0.0), ["ExponentialScheduler", "'sigma_min'", "greater than 0"]),
    (lambda: cs.polyexponential_scheduler(10, 0.0, 1.0, 1.0), ["PolyexponentialScheduler", "'sigma_max'"]),
    (lambda: cs.karras_scheduler(10, 14.6, 0.03, 0.0), ["KarrasScheduler", "'rho'"]),
    (lambda: cs.cfg_guider(None, [], [[torch.zeros(1, 77, 8), {}]], 7.0), ["CFGGuider", "'positive'", "CONDITIONING"]),
    (lambda: cs.dual_cfg_guider(None, [[torch.zeros(1, 77, 8), {}]], "text", [[torch.zeros(1, 77, 8), {}]], 8.0, 8.0),
     ["DualCFGGuider", "'cond2'"]),
])
def test_bad_input_names_node_and_input(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value)


# ------------------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("sampler_name, scheduler", [("euler", "normal"), ("euler_ancestral", "karras"),
                                                     ("dpmpp_2m_sde", "exponential"), ("dpm_2", "normal")])
def test_sampler_custom_reproduces_ksampler(loaded, sampler_name, scheduler):
    model, pos, neg, _, latent = loaded
    from nodes.sampling import sigmas_for

    ref = ksampler(model, SEED, 4, 5.0, sampler_name, scheduler, pos, neg, latent, 1.0)
    # KSampler's own sigmas (dpm_2 drops the penultimate one); BasicScheduler gives the plain schedule
    sigmas = sigmas_for(model.sampling_schedule(), sampler_name, scheduler, 4, 1.0)
    if sampler_name != "dpm_2":
        torch.testing.assert_close(sigmas.float(), cs.basic_scheduler(model, scheduler, 4, 1.0))
    out = cs.sampler_custom(model, True, SEED, 5.0, pos, neg, cs.ksampler_select(sampler_name), sigmas, latent)
    _close(out.output, ref)
    guider = cs.cfg_guider(model, pos, neg, 5.0)
    adv = cs.sampler_custom_advanced(cs.random_noise(SEED), guider, cs.ksampler_select(sampler_name), sigmas, latent)
    _close(adv.output, ref)
    # the denoised output is the last step's x0 estimate: at a final sigma of 0 the result itself
    _close(adv.denoised_output, adv.output, tol=1e-4)


def test_denoised_output_differs_with_leftover_noise(loaded):
    model, pos, neg, _, latent = loaded
    sigmas = cs.basic_scheduler(model, "normal", 6, 1.0)
    high, _ = cs.split_sigmas(sigmas, 3)
    out = cs.sampler_custom(model, True, SEED, 5.0, pos, neg, cs.ksampler_select("euler"), high, latent)
    assert float((out.output["samples"] - out.denoised_output["samples"]).abs().max()) > 0.1


def test_split_schedule_in_two_passes_equals_one(loaded):
    """high_sigmas with noise, then low_sigmas with DisableNoise: the same as one pass (KSamplerAdvanced's hand-off)."""
    model, pos, neg, _, latent = loaded
    sigmas = cs.basic_scheduler(model, "karras", 6, 1.0)
    sampler = cs.ksampler_select("euler")
    guider = cs.cfg_guider(model, pos, neg, 4.0)
    whole = cs.sampler_custom_advanced(cs.random_noise(SEED), guider, sampler, sigmas, latent).output
    high, low = cs.split_sigmas(sigmas, 3)
    first = cs.sampler_custom_advanced(cs.random_noise(SEED), guider, sampler, high, latent).output
    second = cs.sampler_custom_advanced(cs.disable_noise(), guider, sampler, low, first).output
    _close(second, whole, tol=1e-4)


def test_guiders_by_their_algebra(loaded):
    model, pos, neg, other, latent = loaded
    sigmas = cs.basic_scheduler(model, "normal", 3, 1.0)
    sampler, noise = cs.ksampler_select("euler"), cs.random_noise(SEED)

    def run(guider):
        return cs.sampler_custom_advanced(noise, guider, sampler, sigmas, latent).output

    # BasicGuider = the positive prediction alone = CFG at scale 1 = KSampler at cfg 1
    basic = run(cs.basic_guider(model, pos))
    _close(basic, run(cs.cfg_guider(model, pos, neg, 1.0)))
    _close(basic, ksampler(model, SEED, 3, 1.0, "euler", "normal", pos, neg, latent, 1.0))
    # regular DualCFG with cfg_cond2_negative 1 is CFG of cond1 against cond2
    dual = run(cs.dual_cfg_guider(model, pos, neg, other, 3.0, 1.0, "regular"))
    _close(dual, run(cs.cfg_guider(model, pos, neg, 3.0)))
    # nested with cfg_conds 1 is CFG of cond1 against the negative
    nested = run(cs.dual_cfg_guider(model, pos, other, neg, 1.0, 3.0, "nested"))
    _close(nested, run(cs.cfg_guider(model, pos, neg, 3.0)))
    # and the full regular mix differs from both plain CFGs
    full = run(cs.dual_cfg_guider(model, pos, other, neg, 3.0, 2.0, "regular"))
    assert float((full["samples"] - run(cs.cfg_guider(model, pos, neg, 3.0))["samples"]).abs().max()) > 1e-3


def test_add_noise_and_disable_noise(loaded):
    model, _, _, _, latent = loaded
    base = {"samples": torch.full((1, 4, 8, 8), 0.5)}
    sigmas = torch.tensor([3.0, 1.0, 0.0])
    noisy = cs.add_noise(model, cs.random_noise(7), sigmas, base)
    # noise goes in in model space (x 0.18215 for SD1) and comes back raw, as ComfyUI's AddNoise
    expected = 0.5 + torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7)) * 3.0 / 0.18215
    torch.testing.assert_close(noisy["samples"], expected)
    assert cs.add_noise(model, cs.disable_noise(), sigmas, base)["samples"].eq(0.5).all()
    assert cs.add_noise(model, cs.random_noise(7), torch.zeros(0), base) is base
    assert cs.disable_noise().seed == 0 and cs.disable_noise().generate(latent).abs().sum() == 0


def test_empty_sigmas_pass_the_latent_through(loaded):
    model, pos, neg, _, latent = loaded
    out = cs.sampler_custom(model, True, SEED, 5.0, pos, neg, cs.ksampler_select("euler"), torch.zeros(0), latent)
    assert torch.equal(out.output["samples"], latent["samples"])


def test_executor_reports_bad_sigmas_with_node_and_input(sd_env):
    registry, _ = sd_env
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SD1", "steps": 10, "denoise": 0.0}},
        "5": {"class_type": "SetFirstSigma", "inputs": {"sigmas": ["4", 0], "sigma": 20.0}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["2", 0],
            "negative": ["2", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["3", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bad"}},
    }
    result = Executor(registry).execute(prompt, "bad-sigmas")
    assert result.status == "error"
    assert result.error["node_type"] == "SetFirstSigma" and result.error["node_id"] == "5"
    text = result.error["exception_message"]
    assert "SetFirstSigma" in text and "'sigmas'" in text and "empty" in text


def test_sampler_nodes_with_options_reach_the_sampler(loaded, sd_env):
    model, pos, neg, _, latent = loaded
    sigmas = cs.basic_scheduler(model, "karras", 4, 1.0)

    def run(sampler):
        return cs.sampler_custom(model, True, SEED, 4.0, pos, neg, sampler, sigmas, latent).output

    # eta 0 takes no ancestral step: euler_ancestral is euler
    _close(run(cs.sampler_euler_ancestral(0.0, 1.0)), run(cs.ksampler_select("euler")))
    _close(run(cs.sampler_euler_ancestral(1.0, 1.0)), run(cs.ksampler_select("euler_ancestral")))
    _close(run(cs.sampler_dpmpp_2m_sde("heun", 1.0, 1.0, "cpu")), run(cs.ksampler_select("dpmpp_2m_sde_heun")))
    _close(run(cs.sampler_dpmpp_sde(1.0, 1.0, 0.5, "gpu")), run(cs.ksampler_select("dpmpp_sde_gpu")))
    assert cs.sampler_dpmpp_3m_sde(0.5, 1.0, "cpu") == cs.SamplerChoice("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.0})
    assert float((run(cs.sampler_lms(1))["samples"] - run(cs.ksampler_select("lms"))["samples"]).abs().max()) > 1e-4
    info = sd_env[0].object_info()
    assert list(info["SamplerDPMPP_2M_SDE"]["input"]["required"]) == ["solver_type", "eta", "s_noise", "noise_device"]
    assert info["SamplerDPMPP_SDE"]["input"]["required"]["noise_device"][0] == ["gpu", "cpu"]
    assert info["SamplerLMS"]["input"]["required"]["order"][1] == {"default": 4, "min": 1, "max": 100}
