"""RES multistep: the second-order multistep "Refined Exponential Solver" of Zhang et al. 2023
("Improved Order Analysis and Design of Exponential Integrator for Diffusion Models Sampling",
arXiv 2308.02157), an exponential integrator in t = -log(sigma) on the denoised prediction whose
weights (phi functions) satisfy the order conditions for uneven steps.
ComfyUI's four variants: plain, CFG++, ancestral (eta = 1) and ancestral CFG++.
"""

from __future__ import annotations

import torch

from ._common import (
    Denoiser,
    StepCallback,
    ancestral_noise,
    get_ancestral_step,
    report,
    split_extra,
    t_fn,
    to_d,
    uncond_getter,
)


def _phi1(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(t) / t


def _phi2(t: torch.Tensor) -> torch.Tensor:
    return (_phi1(t) - 1.0) / t


def _res_multistep(model: Denoiser, x, sigmas, extra_args, callback: StepCallback, eta: float, cfg_pp: bool,
                   s_noise: float = 1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler) if eta else None
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model) if cfg_pp else None
    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        uncond = uncond_of(denoised) if uncond_of is not None else denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, x, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            # first step (no history) and the final step: Euler
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            assert old_sigma_down is not None  # set with old_denoised
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            # c2: the previous step's length relative to this one (negative: it lies behind)
            c2 = (t_fn(sigmas[i - 1]) - t_fn(old_sigma_down)) / h
            phi1, phi2 = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = torch.exp(-h) * x + h * (b1 * uncond + b2 * old_denoised)
        if eta and sigmas[i + 1] > 0:
            assert noise is not None  # made when eta is set
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond  # with CFG++ the history is the unconditional prediction
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                         s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, 0.0, False, s_noise, noise_sampler)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                disable=None, s_noise=1.0, noise_sampler=None):
    # with CFG++ (Chung et al. 2024, arXiv 2406.08070)
    return _res_multistep(model, x, sigmas, extra_args, callback, 0.0, True, s_noise, noise_sampler)


@torch.no_grad()
def sample_res_multistep_ancestral(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                   disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    # ancestral: each step goes down to sigma_down, then fresh noise of std sigma_up (seeded generator)
    return _res_multistep(model, x, sigmas, extra_args, callback, eta, False, s_noise, noise_sampler)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                          disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, eta, True, s_noise, noise_sampler)
