"""Ancestral samplers for rectified-flow models (SD3/3.5), which ComfyUI runs in place of the VE ones
when the model samples a flow (its ``_RF`` variants).

The VE split of a step into sigma_down plus fresh noise of std sigma_up keeps the noise level right
but not the signal scale of x = (1 - sigma) * x0 + sigma * noise. Here a step goes down to
sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta) along the straight flow path, then the
signal is scaled from alpha_down = 1 - sigma_down up to alpha_next = 1 - sigma_next and noise fills the
variance back to sigma_next^2. With eta = 1, sigma_down = sigma_next^2 / sigma.
The dispatch (flow or not) is in the VE samplers of ``samplers_sde``.
"""

from __future__ import annotations

import torch

from ._common import Denoiser, StepCallback, ancestral_noise, report, split_extra, to_d, uncond_getter


def rf_ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor,
                      eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma_down, alpha_next / alpha_down, renoise std) for a flow step from sigma to sigma_next > 0."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


def _flow_lambda(sigma: torch.Tensor) -> torch.Tensor:
    return ((1 - sigma) / sigma).log()


def _flow_sigma(lam: torch.Tensor) -> torch.Tensor:
    return 1 / (lam.exp() + 1)


def _along_flow(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """x moved along the straight flow path from sigma down to sigma_to, towards the estimate x0."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * x0


def _midpoint_sigma(sigma: torch.Tensor, sigma_down: torch.Tensor) -> torch.Tensor:
    """The DPM-Solver++(2S) stage point, halfway in lambda; at sigma 1 (lambda -inf) a fixed 0.9999."""
    if float(sigma) == 1.0:
        return torch.full_like(sigma, 0.9999)
    lam, lam_down = _flow_lambda(sigma), _flow_lambda(sigma_down)
    return _flow_sigma(lam + 0.5 * (lam_down - lam))


@torch.no_grad()
def sample_euler_ancestral_rf(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                              disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **kwargs)
        report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down, rescale, renoise = rf_ancestral_step(sigma, sigma_next, eta)
        x = _along_flow(x, denoised, sigma, sigma_down)
        if eta > 0:
            x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
    return x


@torch.no_grad()
def sample_dpm_2_ancestral_rf(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                              disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **kwargs)
        report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        sigma_down, rescale, renoise = rf_ancestral_step(sigma, sigma_next, eta)
        sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
        x = x + d_2 * (sigma_down - sigma)
        x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_rf(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                 disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **kwargs)
        report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        sigma_down, rescale, renoise = rf_ancestral_step(sigma, sigma_next, eta)
        sigma_s = _midpoint_sigma(sigma, sigma_down)
        denoised_2 = model(_along_flow(x, denoised, sigma, sigma_s), sigma_s * s_in, **kwargs)
        x = _along_flow(x, denoised_2, sigma, sigma_down)
        if eta > 0:
            x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
    return x


# CFG++ (Chung et al. 2024): both stages step with the unconditional predictions; the guidance of the
# step's first evaluation comes back scaled by alpha_next = 1 - sigma_next.
@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp_rf(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                        disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **kwargs)
        uncond = uncond_of(denoised)
        guidance = denoised - uncond
        report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, uncond) * (sigma_next - sigma)
        else:
            sigma_down, rescale, renoise = rf_ancestral_step(sigma, sigma_next, eta)
            sigma_s = _midpoint_sigma(sigma, sigma_down)
            uncond_2 = uncond_of(model(_along_flow(x, uncond, sigma, sigma_s), sigma_s * s_in, **kwargs))
            x = _along_flow(x, uncond_2, sigma, sigma_down)
            if eta > 0:
                x = rescale * x + noise(sigma, sigma_next) * s_noise * renoise
        x = x + (1 - sigma_next) * guidance
    return x
