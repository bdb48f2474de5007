"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
arXiv 2204.13902), the "tAB" variant ComfyUI runs as ``deis`` (max order 3).

A multistep method on the noise prediction eps = (x - D) / sigma: the past eps values are interpolated
by a Lagrange polynomial in the VP-SDE time t (linear beta schedule with EDM's defaults beta_min=0.1,
beta_d=19.9 derived from sigma 0.002..80, eps_s=1e-3) and x_next = x + integral of that polynomial
over d sigma. The integrals are taken with Gauss-Legendre quadrature in sigma, where the integrand
is smooth (ComfyUI sums 10000 points in t instead; the coefficients agree to about 1e-4).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import Denoiser, StepCallback, report, split_extra, to_d

_EPS_S, _SIGMA_MIN, _SIGMA_MAX = 1e-3, 0.002, 80.0
# VP schedule with sigma(eps_s) = 0.002 and sigma(1) = 80 (Song et al. 2021 VP-SDE, as EDM maps it)
_BETA_D = 2 * (math.log(_SIGMA_MIN**2 + 1) / _EPS_S - math.log(_SIGMA_MAX**2 + 1)) / (_EPS_S - 1)
_BETA_MIN = math.log(_SIGMA_MAX**2 + 1) - 0.5 * _BETA_D
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)


def vp_time(sigma: np.ndarray | float) -> np.ndarray:
    """VP-SDE time t of a VE sigma: the root of 0.5 beta_d t^2 + beta_min t = log(1 + sigma^2)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return (np.sqrt(_BETA_MIN**2 + 2 * _BETA_D * np.log1p(sigma**2)) - _BETA_MIN) / _BETA_D


def deis_coefficients(sigmas: torch.Tensor, max_order: int = 3) -> list[list[float]]:
    """Per step i, the weights of eps_i, eps_{i-1}, ... (empty for first-order steps and steps to sigma 0)."""
    sig = sigmas.detach().cpu().double().numpy()
    ts = vp_time(sig)
    out: list[list[float]] = []
    for i in range(len(sig) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sig[i + 1] <= 0:
            out.append([])
            continue
        a, b = sig[i], sig[i + 1]
        nodes = (b - a) / 2 * _NODES + (a + b) / 2
        tau = vp_time(nodes)
        prev = [ts[i - k] for k in range(order)]
        coeffs = []
        for j in range(order):
            basis = np.ones_like(tau)
            for k in range(order):
                if k != j:
                    basis *= (tau - prev[k]) / (prev[j] - prev[k])
            coeffs.append(float((b - a) / 2 * np.sum(_WEIGHTS * basis)))
        out.append(coeffs)
    return out


@torch.no_grad()
def sample_deis(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None, max_order=3):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    coeffs = deis_coefficients(sigmas, max_order)
    history: list[torch.Tensor] = []  # previous eps, oldest first
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], denoised)
        report(callback, i, x, sigmas[i], denoised)
        if not coeffs[i]:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d  # first step, and the final step to sigma 0: Euler
        else:
            x_next = x + sum(c * dd for c, dd in zip(coeffs[i], [d] + history[::-1]))
        history.append(d)
        if len(history) > max_order - 1:
            history.pop(0)
        x = x_next
    return x
