"""UniPC (Zhao et al. 2023, arXiv 2302.04867): unified predictor-corrector, multistep, data prediction.

Written directly in the VE parametrisation over the caller's sigmas (lambda = -log sigma), which is
the VP algorithm divided through by alpha_t. As in ComfyUI, a final sigma of 0 is replaced by 0.001
(the log-SNR is infinite at 0) and the corrector is skipped on the last step, so a run costs exactly
``len(sigmas) - 1`` model evaluations.
"""

from __future__ import annotations

import torch

from ._common import Denoiser, StepCallback, report, split_extra


def _bh_coefficients(h: torch.Tensor, rks: torch.Tensor, order: int, variant: str):
    """R matrix and b vector of UniPC's order conditions, and B(h) (bh1: B=h, bh2: B=e^h-1), float64."""
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = torch.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}")
    rows, b = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(b), h_phi_1, b_h


def _weighted(coeffs: torch.Tensor, diffs: list[torch.Tensor]) -> torch.Tensor:
    out = diffs[0] * coeffs[0].item()
    for c, d in zip(coeffs[1:], diffs[1:]):
        out = out + d * c.item()
    return out


# UniPC-p / UniC, Zhao et al. 2023, Alg. 2-3 (multistep, B(h) variants bh1/bh2), data prediction.
@torch.no_grad()
def sample_uni_pc(model: Denoiser, x, sigmas, extra_args=None, callback: StepCallback = None, disable=None,
                  variant: str = "bh1", max_order: int = 3):
    kwargs, _ = split_extra(extra_args)
    s_in = x.new_ones([x.shape[0]])
    sig = sigmas.detach().to("cpu", torch.float64).clone()
    if sig[-1] == 0:
        sig[-1] = 0.001
    lam = -sig.log()
    steps = len(sig) - 1
    if steps < 1:
        return x
    order = max(1, min(max_order, steps - 1))

    def denoise(xx: torch.Tensor, i: int) -> torch.Tensor:
        return model(xx, sigmas.new_tensor(float(sig[i])) * s_in, **kwargs)

    hist_m = [denoise(x, 0)]  # denoised estimates at the previous nodes, oldest first
    hist_i = [0]
    for step in range(1, steps + 1):
        step_order = step if step < order else min(order, steps + 1 - step)
        use_corrector = step < steps
        report(callback, step - 1, x, sigmas[step - 1], hist_m[-1])

        i0 = hist_i[-1]
        m0 = hist_m[-1]
        h = lam[step] - lam[i0]
        rks, diffs = [], []
        for k in range(1, step_order):
            rk = (lam[hist_i[-(k + 1)]] - lam[i0]) / h
            rks.append(rk)
            diffs.append((hist_m[-(k + 1)] - m0) / rk.item())
        rks.append(torch.tensor(1.0, dtype=torch.float64))
        R, b, h_phi_1, b_h = _bh_coefficients(h, torch.stack(rks), step_order, variant)

        x_base = (sig[step] / sig[i0]).item() * x - h_phi_1.item() * m0
        x_new = x_base
        if diffs:
            rhos_p = (torch.tensor([0.5], dtype=torch.float64) if step_order == 2
                      else torch.linalg.solve(R[:-1, :-1], b[:-1]))
            x_new = x_base - b_h.item() * _weighted(rhos_p, diffs)
        m_new = None
        if use_corrector:
            m_new = denoise(x_new, step)
            rhos_c = torch.tensor([0.5], dtype=torch.float64) if step_order == 1 else torch.linalg.solve(R, b)
            corr = (m_new - m0) * rhos_c[-1].item()
            if diffs:
                corr = corr + _weighted(rhos_c[:-1], diffs)
            x_new = x_base - b_h.item() * corr
        x = x_new
        if m_new is not None:
            hist_m.append(m_new)
            hist_i.append(step)
            if len(hist_m) > order:
                hist_m.pop(0)
                hist_i.pop(0)
    return x


def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
    # UniPC with B(h) = e^h - 1 (Zhao et al. 2023, "bh2"); better at few steps with guidance.
    return sample_uni_pc(model, x, sigmas, extra_args, callback, disable, variant="bh2", **opts)
