"""Custom sampling: ComfyUI's SamplerCustom / SamplerCustomAdvanced graphs and their parts.

A graph picks the sampler (SAMPLER), the noise levels (SIGMAS), the initial noise (NOISE) and how
predictions are combined (GUIDER) as separate nodes. Names, inputs, defaults, ranges and output order
are ComfyUI's; the sampling itself is nodes.sampling's, exactly as KSampler runs it.
"""
from __future__ import annotations

import contextlib
from typing import Annotated, NamedTuple

import torch

from engine import progress
from engine.inputs import Boolean, Combo, Float, Int
from engine.node import node

from .models.memory import release_text_encoders
from .sampler_nodes import patched_guider
from .sampling import SAMPLER_NAMES, SCHEDULER_NAMES, calculate_sigmas
from .sampling.custom import EmptyNoise, Guider as GuiderValue, RandomNoise as RandomNoiseValue, SamplerChoice
from .sampling.preview import latent_to_rgb
from .sampling.sample import process_latent_in, process_latent_out, sample
from .sampling.schedulers import (
    AYS_NOISE_LEVELS,
    align_your_steps_sigmas,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    polyexponential_sigmas,
    sd_turbo_sigmas,
)
from .types import Conditioning, Guider, Latent, Model, Noise, Sampler, Sigmas

MAX_SEED = 0xFFFFFFFFFFFFFFFF
_PREVIEW_ARCH = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sd3": "sd3"}
# ComfyUI's default sigma range for the model-free schedulers: SD1's table ends
SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675


def _check_sigmas(node_name: str, sigmas: torch.Tensor, input_name: str = "sigmas") -> torch.Tensor:
    """A SIGMAS value must be a 1-D tensor of finite, non-negative noise levels (it may be empty)."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"{node_name}: input '{input_name}' must be SIGMAS (a 1-D tensor), got {type(sigmas).__name__}")
    if sigmas.ndim != 1:
        raise ValueError(f"{node_name}: input '{input_name}' must be 1-D, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() and (not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any())):
        raise ValueError(f"{node_name}: input '{input_name}' holds a negative or non-finite noise level: "
                         f"{sigmas.tolist()}")
    return sigmas


def _check_positive(node_name: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{node_name}: input '{name}' must be greater than 0 for this schedule, got {value}")


def check_conditioning(node_name: str, **conds: list) -> None:
    """A CONDITIONING is a non-empty list of [tensor, options] pairs."""
    for name, value in conds.items():
        if not isinstance(value, list) or not value or not all(
                isinstance(e, (list, tuple)) and e and isinstance(e[0], torch.Tensor) for e in value):
            raise ValueError(f"{node_name}: input '{name}' must be a non-empty CONDITIONING (from a text encode node)")


# ---------------------------------------------------------------------------------------- samplers

@node("KSamplerSelect", category="sampling/custom_sampling/samplers")
def ksampler_select(sampler_name: Annotated[str, Combo(SAMPLER_NAMES)]) -> Sampler:
    """One of KSampler's sampling algorithms, for SamplerCustom / SamplerCustomAdvanced."""
    return SamplerChoice(sampler_name)


_ETA = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
_S_NOISE = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
_NOISE_DEVICE = Combo(["gpu", "cpu"])


@node("SamplerEulerAncestral", category="sampling/custom_sampling/samplers")
def sampler_euler_ancestral(eta: Annotated[float, _ETA], s_noise: Annotated[float, _S_NOISE]) -> Sampler:
    """euler_ancestral with its noise amount (eta) and noise scale."""
    return SamplerChoice("euler_ancestral", {"eta": eta, "s_noise": s_noise})


@node("SamplerDPMPP_2S_Ancestral", category="sampling/custom_sampling/samplers")
def sampler_dpmpp_2s_ancestral(eta: Annotated[float, _ETA], s_noise: Annotated[float, _S_NOISE]) -> Sampler:
    """dpmpp_2s_ancestral with its eta and noise scale."""
    return SamplerChoice("dpmpp_2s_ancestral", {"eta": eta, "s_noise": s_noise})


@node("SamplerDPMPP_SDE", category="sampling/custom_sampling/samplers")
def sampler_dpmpp_sde(eta: Annotated[float, _ETA], s_noise: Annotated[float, _S_NOISE],
                      r: Annotated[float, Float(0.5, min=0.0, max=100.0, step=0.01, round=False)],
                      noise_device: Annotated[str, _NOISE_DEVICE]) -> Sampler:
    """dpmpp_sde with its eta, noise scale, midpoint ratio r and Brownian-tree device."""
    return SamplerChoice("dpmpp_sde" if noise_device == "cpu" else "dpmpp_sde_gpu",
                         {"eta": eta, "s_noise": s_noise, "r": r})


@node("SamplerDPMPP_2M_SDE", category="sampling/custom_sampling/samplers")
def sampler_dpmpp_2m_sde(solver_type: Annotated[str, Combo(["midpoint", "heun"])], eta: Annotated[float, _ETA],
                         s_noise: Annotated[float, _S_NOISE], noise_device: Annotated[str, _NOISE_DEVICE]) -> Sampler:
    """dpmpp_2m_sde with its solver type, eta, noise scale and Brownian-tree device."""
    name = "dpmpp_2m_sde" if noise_device == "cpu" else "dpmpp_2m_sde_gpu"
    return SamplerChoice(name, {"eta": eta, "s_noise": s_noise, "solver_type": solver_type})


@node("SamplerDPMPP_3M_SDE", category="sampling/custom_sampling/samplers")
def sampler_dpmpp_3m_sde(eta: Annotated[float, _ETA], s_noise: Annotated[float, _S_NOISE],
                         noise_device: Annotated[str, _NOISE_DEVICE]) -> Sampler:
    """dpmpp_3m_sde with its eta, noise scale and Brownian-tree device."""
    return SamplerChoice("dpmpp_3m_sde" if noise_device == "cpu" else "dpmpp_3m_sde_gpu",
                         {"eta": eta, "s_noise": s_noise})


@node("SamplerLMS", category="sampling/custom_sampling/samplers")
def sampler_lms(order: Annotated[int, Int(4, min=1, max=100)]) -> Sampler:
    """lms with its order."""
    return SamplerChoice("lms", {"order": order})


# ---------------------------------------------------------------------------------------- schedulers

_STEPS = Int(20, min=1, max=10000)
_SIGMA_MAX = Float(SIGMA_MAX, min=0.0, max=5000.0, step=0.01, round=False)
_SIGMA_MIN = Float(SIGMA_MIN, min=0.0, max=5000.0, step=0.01, round=False)


@node("BasicScheduler", category="sampling/custom_sampling/schedulers")
def basic_scheduler(model: Model, scheduler: Annotated[str, Combo(SCHEDULER_NAMES)],
                    steps: Annotated[int, _STEPS],
                    denoise: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)]) -> Sigmas:
    """KSampler's schedules for this model; with denoise < 1 the tail of a longer schedule."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.zeros(0)
        total = int(steps / denoise)
    sigmas = calculate_sigmas(model.sampling_schedule(), scheduler, total).float().cpu()
    return sigmas[-(steps + 1):]


@node("KarrasScheduler", category="sampling/custom_sampling/schedulers")
def karras_scheduler(steps: Annotated[int, _STEPS], sigma_max: Annotated[float, _SIGMA_MAX],
                     sigma_min: Annotated[float, _SIGMA_MIN],
                     rho: Annotated[float, Float(7.0, min=0.0, max=100.0, step=0.01, round=False)]) -> Sigmas:
    """Karras et al. 2022's schedule between sigma_max and sigma_min."""
    _check_positive("KarrasScheduler", rho=rho)
    return karras_sigmas(steps, sigma_min, sigma_max, rho).float()


@node("ExponentialScheduler", category="sampling/custom_sampling/schedulers")
def exponential_scheduler(steps: Annotated[int, _STEPS], sigma_max: Annotated[float, _SIGMA_MAX],
                          sigma_min: Annotated[float, _SIGMA_MIN]) -> Sigmas:
    """Evenly spaced in log sigma."""
    _check_positive("ExponentialScheduler", sigma_max=sigma_max, sigma_min=sigma_min)
    return exponential_sigmas(steps, sigma_min, sigma_max).float()


@node("PolyexponentialScheduler", category="sampling/custom_sampling/schedulers")
def polyexponential_scheduler(steps: Annotated[int, _STEPS], sigma_max: Annotated[float, _SIGMA_MAX],
                              sigma_min: Annotated[float, _SIGMA_MIN],
                              rho: Annotated[float, Float(1.0, min=0.0, max=100.0, step=0.01, round=False)]) -> Sigmas:
    """Polynomial in log sigma (rho 1 = exponential)."""
    _check_positive("PolyexponentialScheduler", sigma_max=sigma_max, sigma_min=sigma_min)
    return polyexponential_sigmas(steps, sigma_min, sigma_max, rho).float()


@node("BetaSamplingScheduler", category="sampling/custom_sampling/schedulers")
def beta_sampling_scheduler(model: Model, steps: Annotated[int, _STEPS],
                            alpha: Annotated[float, Float(0.6, min=0.0, max=50.0, step=0.01, round=False)],
                            beta: Annotated[float, Float(0.6, min=0.0, max=50.0, step=0.01, round=False)]) -> Sigmas:
    """Timesteps at quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024)."""
    _check_positive("BetaSamplingScheduler", alpha=alpha, beta=beta)
    return beta_sigmas(model.sampling_schedule(), steps, alpha=alpha, beta=beta).float()


@node("SDTurboScheduler", category="sampling/custom_sampling/schedulers")
def sd_turbo_scheduler(model: Model, steps: Annotated[int, Int(1, min=1, max=10)],
                       denoise: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)]) -> Sigmas:
    """SD-Turbo / SDXL-Turbo's 1-10 step schedule (timesteps 999, 899, ...)."""
    return sd_turbo_sigmas(model.sampling_schedule(), steps, denoise)


@node("AlignYourStepsScheduler", category="sampling/custom_sampling/schedulers")
def align_your_steps_scheduler(model_type: Annotated[str, Combo(list(AYS_NOISE_LEVELS))],
                               steps: Annotated[int, Int(10, min=1, max=10000)],
                               denoise: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)]) -> Sigmas:
    """NVIDIA's Align Your Steps noise levels for SD1 / SDXL / SVD, interpolated to the step count."""
    return align_your_steps_sigmas(model_type, steps, denoise)


# ---------------------------------------------------------------------------------------- sigmas

class SigmasPair(NamedTuple):
    high_sigmas: Sigmas
    low_sigmas: Sigmas


@node("SplitSigmas", category="sampling/custom_sampling/sigmas")
def split_sigmas(sigmas: Sigmas, step: Annotated[int, Int(0, min=0, max=10000)]) -> SigmasPair:
    """The schedule up to and from step `step` (both halves share that sigma)."""
    _check_sigmas("SplitSigmas", sigmas)
    return SigmasPair(sigmas[:step + 1], sigmas[step:])


@node("SplitSigmasDenoise", category="sampling/custom_sampling/sigmas")
def split_sigmas_denoise(sigmas: Sigmas,
                         denoise: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)]) -> SigmasPair:
    """Split so the low part holds the last `denoise` fraction of the steps."""
    _check_sigmas("SplitSigmasDenoise", sigmas)
    steps = max(sigmas.shape[-1] - 1, 0)
    total = round(steps * denoise)
    # as ComfyUI: total 0 gives an empty high part and the last sigma alone as the low part
    high = sigmas[:-total] if total > 0 else sigmas[:0]
    return SigmasPair(high, sigmas[-(total + 1):])


@node("FlipSigmas", category="sampling/custom_sampling/sigmas")
def flip_sigmas(sigmas: Sigmas) -> Sigmas:
    """Reverse the schedule (for unsampling); a leading 0 becomes 0.0001."""
    _check_sigmas("FlipSigmas", sigmas)
    if sigmas.numel() == 0:
        return sigmas
    out = sigmas.flip(0).clone()
    if out[0] == 0:
        out[0] = 0.0001
    return out


@node("SetFirstSigma", category="sampling/custom_sampling/sigmas")
def set_first_sigma(sigmas: Sigmas,
                    sigma: Annotated[float, Float(136.0, min=0.0, max=20000.0, step=0.001, round=False)]) -> Sigmas:
    """Replace the first noise level."""
    _check_sigmas("SetFirstSigma", sigmas)
    if sigmas.numel() == 0:
        raise ValueError("SetFirstSigma: input 'sigmas' is empty, there is no first sigma to set")
    out = sigmas.clone()
    out[0] = sigma
    return out


# ---------------------------------------------------------------------------------------- guiders

_CFG = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)


@node("BasicGuider", category="sampling/custom_sampling/guiders")
def basic_guider(model: Model, conditioning: Conditioning) -> Guider:
    """The model's prediction for one conditioning, no classifier-free guidance (for cfg-1 models)."""
    check_conditioning("BasicGuider", conditioning=conditioning)
    return GuiderValue(model, {"positive": conditioning}, 1.0, "basic")


@node("CFGGuider", category="sampling/custom_sampling/guiders")
def cfg_guider(model: Model, positive: Conditioning, negative: Conditioning, cfg: Annotated[float, _CFG]) -> Guider:
    """Classifier-free guidance between a positive and a negative conditioning."""
    check_conditioning("CFGGuider", positive=positive, negative=negative)
    return GuiderValue(model, {"positive": positive, "negative": negative}, cfg, "cfg")


@node("DualCFGGuider", category="sampling/custom_sampling/guiders")
def dual_cfg_guider(model: Model, cond1: Conditioning, cond2: Conditioning, negative: Conditioning,
                    cfg_conds: Annotated[float, _CFG], cfg_cond2_negative: Annotated[float, _CFG],
                    style: Annotated[str, Combo(["regular", "nested"])] = "regular") -> Guider:
    """Guidance by two conditionings: cond1 against cond2 (cfg_conds), cond2 against negative."""
    check_conditioning("DualCFGGuider", cond1=cond1, cond2=cond2, negative=negative)
    return GuiderValue(model, {"positive": cond1, "middle": cond2, "negative": negative}, cfg_conds, "dual",
                       {"cfg2": cfg_cond2_negative, "nested": style == "nested"})


# ---------------------------------------------------------------------------------------- noise

@node("RandomNoise", category="sampling/custom_sampling/noise")
def random_noise(noise_seed: Annotated[int, Int(0, min=0, max=MAX_SEED, control_after_generate=True)]) -> Noise:
    """Initial noise from a CPU generator seeded with noise_seed (the same as KSampler's for a seed)."""
    return RandomNoiseValue(int(noise_seed))


@node("DisableNoise", category="sampling/custom_sampling/noise")
def disable_noise() -> Noise:
    """No initial noise (for a latent that is already noisy)."""
    return EmptyNoise()


@node("AddNoise", category="_for_testing/custom_sampling/noise", experimental=True)
def add_noise(model: Model, noise: Noise, sigmas: Sigmas, latent_image: Latent) -> Latent:
    """Noise the latent to the schedule's span (|first - last| sigma) without sampling."""
    _check_sigmas("AddNoise", sigmas)
    if sigmas.numel() == 0:
        return latent_image
    samples = latent_image["samples"]
    fmt = getattr(model, "latent_format", None)
    scale = (sigmas[0] - sigmas[-1]).abs() if sigmas.numel() > 1 else sigmas[0]
    # noise is added in model space and the result handed back raw; an all-zero (empty) latent is
    # not shifted into model space (both as ComfyUI's AddNoise)
    base = process_latent_in(samples.float(), fmt) if torch.count_nonzero(samples) > 0 else samples.float()
    noisy = model.sampling_schedule().noise_scaling(scale.float(), noise.generate(latent_image).float(), base)
    noisy = process_latent_out(noisy, fmt)
    noisy = torch.nan_to_num(noisy, nan=0.0, posinf=0.0, neginf=0.0).to(samples.dtype)
    return {**latent_image, "samples": noisy}


# ---------------------------------------------------------------------------------------- samplers

class CustomSamplerOutput(NamedTuple):
    output: Latent
    denoised_output: Latent


def _run(node_name: str, guider: GuiderValue, noise_tensor: torch.Tensor, seed: int, sampler: SamplerChoice,
         sigmas: torch.Tensor, latent: dict) -> CustomSamplerOutput:
    _check_sigmas(node_name, sigmas)
    if not isinstance(sampler, SamplerChoice):
        raise TypeError(f"{node_name}: input 'sampler' must be a SAMPLER, got {type(sampler).__name__}")
    model = guider.model
    samples = latent["samples"]
    schedule = model.sampling_schedule()
    device = getattr(model, "load_device", samples.device)
    preview_arch = _PREVIEW_ARCH.get(getattr(model, "arch", "sd1"), "sd1")
    last_x0: list[torch.Tensor] = []

    def on_step(step: int, total: int, x0: torch.Tensor) -> None:
        last_x0[:] = [x0]
        preview = latent_to_rgb(x0[:1].float().cpu(), preview_arch) if progress.wants_preview() else None
        progress.report(step + 1, total, preview)

    steps = max(int(sigmas.numel()) - 1, 0)
    hooks = model.output_block_hooks() if hasattr(model, "output_block_hooks") else contextlib.nullcontext()
    release_text_encoders()   # the prompts are encoded: the sampled model gets the encoders' room
    with hooks:
        out = sample(model.apply, schedule, noise=noise_tensor.to(device), latent_image=samples.to(device),
                     positive=guider.positive, negative=guider.negative, cfg=guider.effective_cfg(),
                     sampler_name=sampler.name, scheduler="normal", steps=steps, seed=int(seed),
                     noise_mask=latent.get("noise_mask"), callback=on_step, sigmas=sigmas,
                     sampler_options=dict(sampler.options),
                     denoiser_factory=guider.denoiser_factory() or patched_guider(model),
                     patches=getattr(model, "sampling_patches", None),
                     latent_format=getattr(model, "latent_format", None))
    result = {**latent, "samples": out.cpu().to(samples.dtype)}
    # x0 is in model space; the denoised LATENT holds raw latents like every other (ComfyUI the same)
    denoised = {**latent, "samples": process_latent_out(last_x0[0].float().cpu(),
                                                        getattr(model, "latent_format", None)).to(samples.dtype)
                } if last_x0 else result
    return CustomSamplerOutput(result, denoised)


@node("SamplerCustom", category="sampling/custom_sampling")
def sampler_custom(model: Model, add_noise: Annotated[bool, Boolean(True)],
                   noise_seed: Annotated[int, Int(0, min=0, max=MAX_SEED, control_after_generate=True)],
                   cfg: Annotated[float, _CFG], positive: Conditioning, negative: Conditioning,
                   sampler: Sampler, sigmas: Sigmas, latent_image: Latent) -> CustomSamplerOutput:
    """CFG sampling with a chosen sampler and schedule; also returns the last denoised estimate."""
    check_conditioning("SamplerCustom", positive=positive, negative=negative)
    noise = (RandomNoiseValue(int(noise_seed)) if add_noise else EmptyNoise()).generate(latent_image)
    guider = GuiderValue(model, {"positive": positive, "negative": negative}, cfg, "cfg")
    return _run("SamplerCustom", guider, noise, int(noise_seed), sampler, sigmas, latent_image)


@node("SamplerCustomAdvanced", category="sampling/custom_sampling")
def sampler_custom_advanced(noise: Noise, guider: Guider, sampler: Sampler, sigmas: Sigmas,
                            latent_image: Latent) -> CustomSamplerOutput:
    """Sampling from separate noise, guider, sampler and schedule nodes."""
    if not isinstance(guider, GuiderValue):
        raise TypeError(f"SamplerCustomAdvanced: input 'guider' must be a GUIDER, got {type(guider).__name__}")
    return _run("SamplerCustomAdvanced", guider, noise.generate(latent_image), noise.seed, sampler, sigmas,
                latent_image)
