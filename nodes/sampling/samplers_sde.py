"""Stochastic samplers: ancestral (fresh Gaussian noise per step) and SDE (Brownian-tree noise).

Ancestral samplers draw from a generator seeded with ``extra_args["seed"]``; SDE samplers use a
Brownian tree seeded with it. Either can be overridden with ``noise_sampler=`` (tests inject noise).
On a rectified-flow model the ancestral ones run their flow forms (``samplers_rf``) and the
exponential-integrator SDE ones work in lambda = log(alpha / sigma) with alpha = 1 - sigma, as
ComfyUI's do (see ``_common``: with alpha exactly 1 the VE results are unchanged).
"""

from __future__ import annotations

import torch

from ._common import (
    Denoiser,
    StepCallback,
    alpha_of,
    ancestral_noise,
    brownian_noise,
    get_ancestral_step,
    half_log_snr,
    is_flow,
    offset_first_sigma,
    report,
    sigma_fn,
    sigma_of_half_log_snr,
    split_extra,
    t_fn,
    to_d,
    uncond_getter,
)
from .samplers_rf import (
    sample_dpm_2_ancestral_rf,
    sample_dpmpp_2s_ancestral_cfg_pp_rf,
    sample_dpmpp_2s_ancestral_rf,
    sample_euler_ancestral_rf,
)


# Euler ancestral (k-diffusion; Song et al. 2021 reverse SDE split into an ODE step + noise), eta=1.
@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    if is_flow(model):
        return sample_euler_ancestral_rf(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# CFG++ (Chung et al. 2024, arXiv 2406.08070) with Euler-ancestral steps, eta=1.
@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                  disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model)
    flow = is_flow(model)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha, alpha_next = alpha_of(sigmas[i], flow), alpha_of(sigmas[i + 1], flow)
        # the DDIM-style split in the noise-to-signal ratio sigma / alpha, then back to x's scale; at a
        # flow's sigma 1 that ratio is infinite and the step is all fresh noise (ComfyUI's split comes to
        # sigma_up = sigma_to there too: Python's min() passes over the NaN)
        if float(alpha) == 0.0 and eta:
            sigma_down, sigma_up = torch.zeros_like(alpha), sigmas[i + 1] / alpha_next
        else:
            sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha, sigmas[i + 1] / alpha_next, eta)
        x = alpha_next * denoised + to_d(x, sigmas[i], alpha * uncond_of(denoised)) * (alpha_next * sigma_down)
        if eta > 0 and s_noise > 0:
            x = x + alpha_next * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# DPM-Solver-2 midpoint step to sigma_down plus ancestral noise (k-diffusion "dpm_2_ancestral").
@torch.no_grad()
def sample_dpm_2_ancestral(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    if is_flow(model):
        return sample_dpm_2_ancestral_rf(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
            x = x + d_2 * (sigma_down - sigma)
            x = x + noise(sigma, sigmas[i + 1]) * s_noise * sigma_up
    return x


# DPM-Solver++(2S) single-step, Lu et al. 2022 (arXiv 2211.01095) Alg. 1, with ancestral noise.
@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                              eta=1.0, s_noise=1.0, noise_sampler=None):
    if is_flow(model):
        return sample_dpmpp_2s_ancestral_rf(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                            noise_sampler)
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        report(callback, i, x, sigma, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = t_fn(sigma), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-0.5 * h).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in, **kwargs)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigma, sigmas[i + 1]) * s_noise * sigma_up
    return x


# DPM-Solver++ (stochastic, 2 stages, r=1/2), k-diffusion "dpmpp_sde"; Lu et al. 2022 with SDE noise.
@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                     eta=1.0, s_noise=1.0, noise_sampler=None, r=0.5, cpu_noise=True):
    kwargs, seed = split_extra(extra_args)
    noise = brownian_noise(x, sigmas, seed, noise_sampler, cpu=cpu_noise)
    s_in = x.new_ones([x.shape[0]])
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    fac = 1 / (2 * r)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        report(callback, i, x, sigma, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam, lam_next = half_log_snr(sigma, flow), half_log_snr(sigmas[i + 1], flow)
        h = lam_next - lam
        lam_1 = lam + r * h
        sigma_1 = sigma_of_half_log_snr(lam_1, flow)
        alpha, alpha_1, alpha_next = alpha_of(sigma, flow), alpha_of(sigma_1, flow), alpha_of(sigmas[i + 1], flow)
        # stage 1: ancestral step to the intermediate lambda (the split is in the ratio sigma / alpha)
        sd, su = get_ancestral_step(lam.neg().exp(), lam_1.neg().exp(), eta)
        h_ = sd.log().neg() - lam
        x_2 = (alpha_1 / alpha) * (-h_).exp() * x - alpha_1 * (-h_).expm1() * denoised
        if inject:
            x_2 = x_2 + alpha_1 * noise(sigma, sigma_1) * s_noise * su
        denoised_2 = model(x_2, sigma_1 * s_in, **kwargs)
        # stage 2: full step with the blended denoised estimate
        sd, su = get_ancestral_step(lam.neg().exp(), lam_next.neg().exp(), eta)
        h_ = sd.log().neg() - lam
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_next / alpha) * (-h_).exp() * x - alpha_next * (-h_).expm1() * denoised_d
        if inject:
            x = x + alpha_next * noise(sigma, sigmas[i + 1]) * s_noise * su
    return x


# DPM-Solver++(2M) SDE, Lu et al. 2022 (arXiv 2211.01095) Sec. 5 / App. B; solver_type midpoint or heun.
@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint", cpu_noise=True):
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    kwargs, seed = split_extra(extra_args)
    noise = brownian_noise(x, sigmas, seed, noise_sampler, cpu=cpu_noise)
    s_in = x.new_ones([x.shape[0]])
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = half_log_snr(sigmas[i + 1], flow) - half_log_snr(sigmas[i], flow)
            eta_h = eta * h
            alpha_next = alpha_of(sigmas[i + 1], flow)
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + alpha_next * (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                assert h_last is not None  # set with old_denoised
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_next * ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) \
                        * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_next * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta and s_noise:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    # DPM-Solver++(2M) SDE with the Heun-type second-order correction (Lu et al. 2022).
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, solver_type="heun", **opts)


# DPM-Solver++(3M) SDE (k-diffusion; third-order multistep extension of Lu et al. 2022).
@torch.no_grad()
def sample_dpmpp_3m_sde(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, cpu_noise=True):
    kwargs, seed = split_extra(extra_args)
    noise = brownian_noise(x, sigmas, seed, noise_sampler, cpu=cpu_noise)
    s_in = x.new_ones([x.shape[0]])
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = half_log_snr(sigmas[i + 1], flow) - half_log_snr(sigmas[i], flow)
            h_eta = h * (eta + 1)
            alpha_next = alpha_of(sigmas[i + 1], flow)
            # sigma ratio: exp(-h) * alpha ratio, which is exp(-h) for VE (kept that way there)
            decay = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() if flow else torch.exp(-h_eta)
            x = decay * x + alpha_next * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                assert denoised_1 is not None and denoised_2 is not None and h_1 is not None  # set with h_2
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_next * phi_2) * d1 - (alpha_next * phi_3) * d2
            elif h_1 is not None:
                assert denoised_1 is not None  # set with h_1
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + alpha_next * phi_2 * d
            if eta and s_noise:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _ddpm_step(x_vp, sigma, sigma_prev, eps, noise):
    """Ho et al. 2020 posterior mean (Eq. 11) plus posterior-variance noise, in VP form."""
    ac = 1 / (sigma * sigma + 1)
    ac_prev = 1 / (sigma_prev * sigma_prev + 1)
    alpha = ac / ac_prev
    mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - ac).sqrt())
    if sigma_prev > 0:
        mu = mu + ((1 - alpha) * (1.0 - ac_prev) / (1.0 - ac)).sqrt() * noise(sigma, sigma_prev)
    return mu


# DDPM ancestral sampling, Ho et al. 2020, Alg. 2 (over an arbitrary sigma subsequence).
@torch.no_grad()
def sample_ddpm(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        report(callback, i, x, sigma, denoised)
        x = _ddpm_step(x / torch.sqrt(1.0 + sigma**2), sigma, sigmas[i + 1], (x - denoised) / sigma, noise)
        if sigmas[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2)
    return x


# Latent Consistency Model sampling, Luo et al. 2023 (arXiv 2310.04378) Alg. 1: predict x0, re-noise.
@torch.no_grad()
def sample_lcm(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
               noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    flow = is_flow(model)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            # re-noise as the model noises: x0 + sigma * noise, or (1 - sigma) * x0 + sigma * noise for flow
            if flow:
                x = model.schedule.noise_scaling(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), x)  # type: ignore[attr-defined]
            else:
                x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


# DPM-Solver++(2S) ancestral with CFG++ (Chung et al. 2024, arXiv 2406.08070): both stages step with the
# unconditional predictions (the midpoint's guided output is unused), then the guidance vector of the
# step's first evaluation, denoised - uncond, is added back once the noise is in.
@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                     disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    if is_flow(model):
        return sample_dpmpp_2s_ancestral_cfg_pp_rf(model, x, sigmas, extra_args, callback, disable, eta, s_noise,
                                                   noise_sampler)
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        uncond = uncond_of(denoised)
        guidance = denoised - uncond
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        report(callback, i, x, sigma, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, uncond) * (sigma_down - sigma)
        else:
            t, t_next = t_fn(sigma), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-0.5 * h).expm1() * uncond
            uncond_2 = uncond_of(model(x_2, sigma_fn(s) * s_in, **kwargs))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * uncond_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigma, sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance
    return x


def _er_sde_noise_scaler(v: torch.Tensor) -> torch.Tensor:
    # the ER-SDE paper's default noise scale function for VP models: lambda * (e^(lambda^0.3) + 10)
    return v * ((v**0.3).exp() + 10.0)


# ER-SDE-Solver-3 (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time SDE for
# Diffusion Models", arXiv 2309.06169): stages 1-3 use the last 1-3 denoised values; the integrals of the
# noise-scale function are 200-point Riemann sums (as the reference implementation). With alpha = 1
# (VE parametrisation) the paper's lambda = sigma / alpha is sigma itself.
@torch.no_grad()
def sample_er_sde(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                  s_noise=1.0, noise_sampler=None, noise_scaler=None, max_stage=3):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    scaler = _er_sde_noise_scaler if noise_scaler is None else noise_scaler
    points = 200
    index = torch.arange(points, dtype=torch.float32, device=x.device)
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    # the paper's lambda is sigma / alpha: sigma itself for VE, sigma / (1 - sigma) for flow
    lambdas = half_log_snr(sigmas, flow).neg().exp() if flow else sigmas
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = lambdas[i], lambdas[i + 1]
            alpha_s, alpha_t = (sigmas[i] / lam_s, sigmas[i + 1] / lam_t) if flow else (1.0, 1.0)
            r = scaler(lam_t) / scaler(lam_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / points
                pos = lam_t + index * step
                scaled = scaler(pos)
                integral = torch.sum(1 / scaled) * step
                assert old_denoised is not None  # stage >= 2: there was a previous step
                denoised_d = (denoised - old_denoised) / (lam_s - lambdas[i - 1])
                x = x + alpha_t * (dt + integral * scaler(lam_t)) * denoised_d
                if stage >= 3:
                    assert old_denoised_d is not None  # stage >= 3: set on the step before
                    integral_u = torch.sum((pos - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - lambdas[i - 2]) / 2)
                    x = x + alpha_t * (dt**2 / 2 + integral_u * scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                std = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * std
        old_denoised = denoised
    return x


def _ei_phi1(h: torch.Tensor) -> torch.Tensor:
    """h * phi_1(h) of exponential integrators."""
    return torch.expm1(h)


def _ei_phi2(h: torch.Tensor) -> torch.Tensor:
    """h * phi_2(h) of exponential integrators."""
    return (torch.expm1(h) - h) / h


# SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from
# Diffusion Models", arXiv 2305.14267), data prediction in lambda = -log(sigma), stage r = 1/2, eta = 1.
# The two sub-steps' noises are correlated as increments of one Brownian path.
@torch.no_grad()
def sample_seeds_2(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                   eta=1.0, s_noise=1.0, noise_sampler=None, r=0.5, solver_type="phi_1"):
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    inject = eta > 0 and s_noise > 0
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sigma_1 = sigma_of_half_log_snr(torch.lerp(lam_s, lam_t, r), flow)
        alpha_1, alpha_t = alpha_of(sigma_1, flow), alpha_of(sigmas[i + 1], flow)
        x_2 = sigma_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_1 * _ei_phi1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1 * s_in, **kwargs)
        if solver_type == "phi_1":
            x = (sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
                 - alpha_t * _ei_phi1(-h_eta) * torch.lerp(denoised, denoised_2, fac))
        else:
            b2 = _ei_phi2(-h_eta) / r
            b1 = _ei_phi1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            seg = (r - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# SEEDS-3 (Gonzalez et al. 2023, arXiv 2305.14267): three stages at r1 = 1/3, r2 = 2/3, eta = 1.
@torch.no_grad()
def sample_seeds_3(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                   eta=1.0, s_noise=1.0, noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3):
    kwargs, seed = split_extra(extra_args)
    noise = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    inject = eta > 0 and s_noise > 0
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = half_log_snr(sigmas[i], flow), half_log_snr(sigmas[i + 1], flow)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sigma_1 = sigma_of_half_log_snr(torch.lerp(lam_s, lam_t, r_1), flow)
        sigma_2 = sigma_of_half_log_snr(torch.lerp(lam_s, lam_t, r_2), flow)
        alpha_1, alpha_2 = alpha_of(sigma_1, flow), alpha_of(sigma_2, flow)
        alpha_t = alpha_of(sigmas[i + 1], flow)
        x_2 = sigma_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_1 * _ei_phi1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1 * s_in, **kwargs)
        a3_2 = r_2 / r_1 * _ei_phi2(-r_2 * h_eta)
        a3_1 = _ei_phi1(-r_2 * h_eta) - a3_2
        x_3 = sigma_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_1, sigma_2)
            x_3 = x_3 + sde_noise * sigma_2 * s_noise
        denoised_3 = model(x_3, sigma_2 * s_in, **kwargs)
        b3 = _ei_phi2(-h_eta) / r_2
        b1 = _ei_phi1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            seg = (r_2 - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise(sigma_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x
