"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models", NeurIPS 2023, arXiv 2309.05019): a stochastic Adams predictor (order 3) - corrector (order 4)
method on the denoised prediction in lambda = log(alpha / sigma): -log(sigma) in the VE parametrisation
(alpha = 1), -logit(sigma) for rectified flow (alpha = 1 - sigma), where the weights carry alpha_t.

The stochasticity tau is 1 inside the sigma band between the 20% and 80% sampling-progress points
and 0 (an ODE step) outside, as ComfyUI's default. ``sa_solver_pece`` re-evaluates the model on each
corrected state (Predict-Evaluate-Correct-Evaluate), one extra call per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch

from ._common import Denoiser, StepCallback, ancestral_noise, is_flow, offset_first_sigma, report, split_extra
from .model_sampling import DiscreteSchedule

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(12)


def adams_coefficients(points: np.ndarray, lam_s: float, lam_t: float, tau: float) -> np.ndarray:
    """b_j = (1 + tau^2) * integral_{lam_s}^{lam_t} e^{(1 + tau^2)(lam - lam_t)} l_j(lam) d lam (paper eqs. 15, 18).

    l_j is the Lagrange basis over ``points`` (the lambdas of the denoised values used); the integrand
    is an exponential times a low-degree polynomial, so 12-point Gauss-Legendre is exact to round-off.
    """
    k = 1.0 + tau * tau
    nodes = (lam_t - lam_s) / 2 * _NODES + (lam_s + lam_t) / 2
    weight = (lam_t - lam_s) / 2 * _WEIGHTS * k * np.exp(k * (nodes - lam_t))
    out = np.empty(len(points))
    for j in range(len(points)):
        basis = np.ones_like(nodes)
        for m in range(len(points)):
            if m != j:
                basis *= (nodes - points[m]) / (points[j] - points[m])
        out[j] = float(np.sum(weight * basis))
    return out


def _tau_band(model: Denoiser, eta: float = 1.0) -> Callable[[float], float]:
    """tau(sigma) = eta between the sigmas at 20% and 80% progress of the model's schedule, else 0."""
    schedule = getattr(model, "schedule", None)
    if not isinstance(schedule, DiscreteSchedule):
        schedule = DiscreteSchedule()  # a bare denoiser: assume SD's schedule
    start, end = schedule.percent_to_sigma(0.2), schedule.percent_to_sigma(0.8)
    return lambda sigma: eta if start >= sigma >= end else 0.0


def _combine(preds: list[torch.Tensor], coeffs: np.ndarray) -> torch.Tensor:
    return cast(torch.Tensor, sum(float(c) * p for c, p in zip(coeffs, preds)))  # never empty: a tensor


@torch.no_grad()
def sample_sa_solver(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                     tau_func=None, s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4,
                     use_pece=False):
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra(extra_args)
    noise_of = ancestral_noise(x, seed, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    tau_func = _tau_band(model) if tau_func is None else tau_func
    flow = is_flow(model)
    sigmas = offset_first_sigma(model, sigmas, flow)
    sig = [float(s) for s in sigmas]
    # lambda = log(alpha / sigma); the final sigma 0 is at +inf (its step is the plain denoise)
    lambdas = [(float(np.log((1 - s) / s)) if flow else -float(np.log(s))) if s > 0 else float("inf") for s in sig]

    def alpha(k: int) -> float:  # the weights' alpha_t: 1 - sigma for flow, 1 for VE
        return 1.0 - sig[k] if flow else 1.0
    keep = max(predictor_order, corrector_order)
    x_pred = x  # x: the corrected state, x_pred: the predicted next state
    h, tau, noise = 0.0, 0.0, None
    preds: list[torch.Tensor] = []
    to_end = sig[-1] == 0  # lower the orders over the last steps for stability
    n = len(sigmas)
    for i in range(n - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **kwargs)
        report(callback, i, x_pred, sigmas[i], denoised)
        preds = (preds + [denoised])[-keep:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if to_end:
            p_order = min(p_order, n - 2 - i)
            c_order = min(c_order, n - 1 - i)

        # corrector: redo the last step from the previous corrected state, now including D(x_pred)
        if c_order == 0:
            x = x_pred
        else:
            b = adams_coefficients(np.array(lambdas[i - c_order + 1 : i + 1]), lambdas[i - 1], lambdas[i], tau) \
                * alpha(i)
            x = float(sig[i] / sig[i - 1] * np.exp(-(tau**2) * h)) * x + _combine(preds[-c_order:], b)
            if noise is not None:
                x = x + noise  # the same Brownian increment the predictor used
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **kwargs)
                preds[-1] = denoised

        # predictor
        if sig[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_func(sig[i + 1])
            b = adams_coefficients(np.array(lambdas[i - p_order + 1 : i + 1]), lambdas[i], lambdas[i + 1], tau) \
                * alpha(i + 1)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = float(sig[i + 1] / sig[i] * np.exp(-(tau**2) * h)) * x + _combine(preds[-p_order:], b)
            noise = None
            if tau > 0 and s_noise > 0:
                std = sig[i + 1] * np.sqrt(-np.expm1(-2 * tau**2 * h)) * s_noise
                noise = noise_of(sigmas[i], sigmas[i + 1]) * float(std)
                x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
def sample_sa_solver_pece(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                          tau_func=None, s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4):
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler,
                            predictor_order, corrector_order, use_pece=True)
