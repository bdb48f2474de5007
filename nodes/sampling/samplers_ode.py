"""Deterministic (probability-flow ODE) samplers."""

from __future__ import annotations

import numpy as np
import torch

from ._common import (
    Denoiser,
    StepCallback,
    alpha_of,
    ancestral_noise,
    is_flow,
    report,
    sigma_fn,
    split_extra,
    t_fn,
    to_d,
    uncond_getter,
)


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras' optional "churn": raise the noise level to sigma_hat by adding fresh noise (0 by default)."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        eps = noise_sampler(sigma, sigma_hat) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


# Karras et al. 2022 "Elucidating the Design Space...", Alg. 2 with Euler steps (no second-order correction).
@torch.no_grad()
def sample_euler(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    noise = ancestral_noise(x, seed, noise_sampler) if s_churn > 0 else None
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        report(callback, i, x, sigmas[i], denoised, sigma_hat)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


# CFG++ (Chung et al. 2024, arXiv 2406.08070) with Euler steps: renoise along the unconditional direction
# (for flow, the noise direction of x = alpha * uncond + sigma * noise, and the guided x0 scaled by alpha).
@torch.no_grad()
def sample_euler_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model)
    flow = is_flow(model)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], alpha_of(sigmas[i], flow) * uncond_of(denoised))
        report(callback, i, x, sigmas[i], denoised)
        x = alpha_of(sigmas[i + 1], flow) * denoised + d * sigmas[i + 1]
    return x


# Karras et al. 2022, Alg. 2 (Heun's 2nd-order method; Euler on the final step to sigma=0).
@torch.no_grad()
def sample_heun(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    kwargs, seed = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    noise = ancestral_noise(x, seed, noise_sampler) if s_churn > 0 else None
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        report(callback, i, x, sigmas[i], denoised, sigma_hat)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            x = x + (d + d_2) / 2 * dt
    return x


# Heun++ (sd-webui-samplers-scheduler "Heun++2"): 3-stage look-ahead, derivatives weighted by sigma.
@torch.no_grad()
def sample_heunpp2(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        d = to_d(x, sigma, denoised)
        report(callback, i, x, sigma, denoised)
        dt = sigmas[i + 1] - sigma
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **kwargs))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


# DPM-Solver-2 (Lu et al. 2022) in Karras' form: midpoint in log-sigma (k-diffusion "dpm_2").
@torch.no_grad()
def sample_dpm_2(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **kwargs)
        d = to_d(x, sigma, denoised)
        report(callback, i, x, sigma, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
            x = x + d_2 * (sigmas[i + 1] - sigma)
    return x


def _lms_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial through t_i, t_{i-1}, ...

    The integrand is a polynomial of degree < 4, so 4-point Gauss-Legendre quadrature is exact.
    """
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = float(t[i]), float(t[i + 1])
    tau = (b - a) / 2 * nodes + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
    return float((b - a) / 2 * np.sum(weights * prod))


# Linear multistep (Adams-Bashforth with variable steps in sigma), order 4, as k-diffusion "lms".
@torch.no_grad()
def sample_lms(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None, order=4):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    sig_np = sigmas.detach().cpu().double().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        report(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            # The polynomial's extrapolation to sigma=0 is less exact than the denoiser itself.
            x = denoised
            continue
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, sig_np, i, j) for j in range(cur)]
        x = x + sum(c * dd for c, dd in zip(coeffs, reversed(ds)))
    return x


# DPM-Solver++(2M), Lu et al. 2022 (arXiv 2211.01095), Alg. 2, data prediction, variable step.
@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report(callback, i, x, sigmas[i], denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


# iPNDM, Zhang & Chen 2023 (DEIS paper, arXiv 2204.13902): fixed-coefficient Adams-Bashforth up to order 4.
@torch.no_grad()
def sample_ipndm(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None, max_order=4):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    history: list[torch.Tensor] = []  # previous derivatives, oldest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **kwargs)
        d = to_d(x, sigma, denoised)
        report(callback, i, x, sigma, denoised)
        order = min(max_order, i + 1)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + dt * d
        elif order == 2:
            x_next = x + dt * (3 * d - history[-1]) / 2
        elif order == 3:
            x_next = x + dt * (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            x_next = x + dt * (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history.append(d)
        if len(history) > max_order - 1:
            history.pop(0)
        x = x_next
    return x


# DPM-Solver++(2M) (Lu et al. 2022) with CFG++ (Chung et al. 2024, arXiv 2406.08070): x is carried along
# the unconditional prediction and lands on the guided one; the 2M correction uses the previous uncond.
@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model)
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        uncond = uncond_of(denoised)
        report(callback, i, x, sigmas[i], denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        x = denoised + torch.exp(-h) * (x - uncond)
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (t - t_fn(sigmas[i - 1])) / h
            x = x - torch.expm1(-h) / (2 * r) * (denoised - old_uncond)
        old_uncond = uncond
    return x


def _ipndm_v_coeffs(h: list[float], order: int) -> list[float]:
    """Weights of d_cur, d_prev1, ... for iPNDM-v, the variable-step iPNDM of Zhou et al. 2024
    ("Fast ODE-based Sampling for Diffusion Models in Around 5 Steps", diff-solvers).

    ``h = [h_n, h_{n-1}, h_{n-2}, h_{n-3}]`` are the latest sigma steps (negative). Order 2 is the exact
    variable-step Adams-Bashforth rule. Orders 3 and 4 are the published closed forms, which are not
    exact Adams-Bashforth: order 3 matches it only on uniform steps, and order 4 not even there
    (57/24, -65/24, 43/24, -11/24 instead of 55/24, -59/24, 37/24, -9/24); both are still consistent
    (weights sum to 1). They are kept as published because ComfyUI's ``ipndm_v`` runs exactly these.
    """
    hn, h1 = h[0], h[1]
    first = [(2 + hn / h1) / 2, -(hn / h1) / 2]
    if order == 2:
        return first
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return [first[0] + t1, first[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) * (
        hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [
        first[0] + t1 + t2,
        first[1] - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
        t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    ]


# iPNDM-v: iPNDM (Zhang & Chen 2023) with step-size-aware multistep weights (see _ipndm_v_coeffs).
@torch.no_grad()
def sample_ipndm_v(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                   max_order=4):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    sig = [float(s) for s in sigmas]
    history: list[torch.Tensor] = []  # previous derivatives, oldest first
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        report(callback, i, x, sigmas[i], denoised)
        order = min(max_order, i + 1)
        if sig[i + 1] == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        else:
            steps = [sig[i + 1 - k] - sig[i - k] for k in range(order)]  # h_n, h_{n-1}, ...
            coeffs = _ipndm_v_coeffs(steps, order)
            x_next = x + steps[0] * sum(c * dd for c, dd in zip(coeffs, [d] + history[::-1]))
        history.append(d)
        if len(history) > max_order - 1:
            history.pop(0)
        x = x_next
    return x


# Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
# Optimization Perspective"): Euler plus (ge_gamma - 1) times the change of the direction since the last step.
def _gradient_estimation(model: Denoiser, x, sigmas, extra_args, callback: StepCallback, ge_gamma: float, cfg_pp: bool):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    uncond_of = uncond_getter(model) if cfg_pp else None
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], uncond_of(denoised) if uncond_of is not None else denoised)
        report(callback, i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@torch.no_grad()
def sample_gradient_estimation(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                               disable=None, ge_gamma=2.0):
    return _gradient_estimation(model, x, sigmas, extra_args, callback, ge_gamma, cfg_pp=False)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None,
                                      disable=None, ge_gamma=2.0):
    # the same with CFG++ (Chung et al. 2024): the direction comes from the unconditional prediction
    return _gradient_estimation(model, x, sigmas, extra_args, callback, ge_gamma, cfg_pp=True)
