"""Guiders beyond plain CFG: denoisers that combine more than a positive and a negative prediction.

Each is a ``CFGDenoiser`` (same conditioning resolution, batching, inpainting blend and CFG++ protocol)
whose ``guide`` mixes its own set of predictions. ``sample(..., denoiser_factory=...)`` builds them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .guidance import CFGDenoiser, Conditioning, resolve_conditioning


class _ExtraEntries(CFGDenoiser):
    def _extra(self, conditioning: Conditioning) -> list:
        entries = resolve_conditioning(conditioning, self.schedule, self.latent_shape)
        self._has_ranges = self._has_ranges or any(
            e.sigma_start is not None or e.sigma_end is not None for e in entries)
        return entries


class DualCFGDenoiser(_ExtraEntries):
    """Two positive prompts and a negative (ComfyUI's DualCFGGuider).

    regular: neg + (cond2 - neg) * cfg_cond2_negative + (cond1 - cond2) * cfg_conds
    nested:  neg + cfg_cond2_negative * ((cond2 + (cond1 - cond2) * cfg_conds) - neg)
    """

    def __init__(self, apply_model, schedule, cond1: Conditioning, cond2: Conditioning, negative: Conditioning,
                 cfg_conds: float, cfg_cond2_negative: float, nested: bool = False, **kwargs: Any) -> None:
        super().__init__(apply_model, schedule, cond1, negative, cfg_conds, **kwargs)
        self.middle = self._extra(cond2)
        self.cfg2 = float(cfg_cond2_negative)
        self.nested = nested

    def guide(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cfg1, cfg2 = self.cfg, self.cfg2
        if self.nested:
            pos, mid, neg = self.predict_sides(x, sigma, [self.positive, self.middle, self.negative])
            self.last_uncond = neg
            return neg + cfg2 * ((mid + (pos - mid) * cfg1) - neg)
        # as ComfyUI: at cfg_cond2_negative 1 the negative does not count, at both 1 neither does cond2
        skip_neg = math.isclose(cfg2, 1.0) and not self.need_uncond
        skip_mid = skip_neg and math.isclose(cfg1, 1.0)
        sides = [self.positive] + ([] if skip_mid else [self.middle]) + ([] if skip_neg else [self.negative])
        preds = self.predict_sides(x, sigma, sides)
        pos = preds[0]
        mid = pos if skip_mid else preds[1]
        uncond = None if skip_neg else preds[-1]
        self.last_uncond = uncond
        base = mid if uncond is None else uncond + (mid - uncond) * cfg2
        return base + (pos - mid) * cfg1


def perp_neg(pos: torch.Tensor, neg: torch.Tensor, empty: torch.Tensor, neg_scale: float, cfg: float) -> torch.Tensor:
    """Perp-Neg (Armandpour et al. 2023): only the part of the negative direction perpendicular to the
    positive one is pushed away from. Directions are taken from the empty-prompt prediction; the
    projection is over the whole batch tensor (as ComfyUI computes it)."""
    p = pos - empty
    n = neg - empty
    denom = torch.sum(p * p)
    proj = torch.sum(n * p) / denom if float(denom) > 0 else torch.zeros((), dtype=p.dtype, device=p.device)
    perp = n - proj * p
    return empty + cfg * (p - perp * neg_scale)


class PerpNegDenoiser(_ExtraEntries):
    """CFG with Perp-Neg against an empty-prompt prediction (ComfyUI's PerpNegGuider / PerpNeg)."""

    def __init__(self, apply_model, schedule, positive: Conditioning, negative: Conditioning,
                 empty: Conditioning, cfg: float, neg_scale: float, **kwargs: Any) -> None:
        super().__init__(apply_model, schedule, positive, negative, cfg, **kwargs)
        self.empty = self._extra(empty)
        self.neg_scale = float(neg_scale)

    def guide(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        pos, neg, empty = self.predict_sides(x, sigma, [self.positive, self.negative, self.empty])
        self.last_uncond = neg
        return perp_neg(pos, neg, empty, self.neg_scale, self.cfg)
