"""The values custom-sampling graphs pass around: SAMPLER, NOISE and GUIDER (ComfyUI's socket types).

SIGMAS is a plain 1-D float tensor. The model inside a guider is duck-typed (``apply``,
``sampling_schedule()``), so this module stays free of sdflow imports like the rest of the package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .guiders import DualCFGDenoiser, PerpNegDenoiser
from .sample import prepare_noise
from .samplers import get_sampler


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler name from KSampler.SAMPLERS plus keyword options for it (eta, s_noise, ...)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_sampler(self.name)  # unknown names fail here, with the list of known ones


class NoiseSource:
    """Initial noise for a latent; ``seed`` also seeds the samplers' own per-step noise."""

    seed: int = 0

    def generate(self, latent: dict) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RandomNoise(NoiseSource):
    seed: int = 0

    def generate(self, latent: dict) -> torch.Tensor:
        return prepare_noise(latent["samples"], self.seed, latent.get("batch_index"))


@dataclass(frozen=True)
class EmptyNoise(NoiseSource):
    """No initial noise (DisableNoise); seed 0 for the samplers, as ComfyUI."""

    seed: int = 0

    def generate(self, latent: dict) -> torch.Tensor:
        samples = latent["samples"]
        return torch.zeros(samples.shape, dtype=samples.dtype, device="cpu")


@dataclass
class Guider:
    """A model and its conditionings, and how to combine their predictions into one denoised estimate.

    kind: "cfg" (positive/negative, ``cfg``), "basic" (positive only), "dual" (cond1, cond2, negative;
    ``cfg`` for cond1 vs cond2, ``options['cfg2']`` for cond2 vs negative, ``options['nested']``),
    "perpneg" (positive, negative, ``conds['empty']``, ``options['neg_scale']``).
    """

    model: Any
    conds: dict[str, list]
    cfg: float = 1.0
    kind: str = "cfg"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def positive(self) -> list:
        return self.conds.get("positive", [])

    @property
    def negative(self) -> list:
        return self.conds.get("negative", [])

    def denoiser_factory(self) -> Callable[..., Any] | None:
        """What ``sample(denoiser_factory=...)`` needs for this guider (None: plain CFG)."""
        if self.kind == "dual":
            middle, nested, cfg2 = self.conds["middle"], bool(self.options.get("nested")), self.options["cfg2"]

            def dual(apply_model, schedule, positive, negative, cfg, **kw):
                return DualCFGDenoiser(apply_model, schedule, positive, middle, negative, cfg, cfg2, nested, **kw)
            return dual
        if self.kind == "perpneg":
            return functools.partial(_perpneg, empty=self.conds["empty"], neg_scale=self.options["neg_scale"])
        return None

    def effective_cfg(self) -> float:
        return 1.0 if self.kind == "basic" else float(self.cfg)


def _perpneg(apply_model, schedule, positive, negative, cfg, *, empty, neg_scale, **kw):
    return PerpNegDenoiser(apply_model, schedule, positive, negative, empty, cfg, neg_scale, **kw)


__all__ = ["EmptyNoise", "Guider", "NoiseSource", "RandomNoise", "SamplerChoice"]
