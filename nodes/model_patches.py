"""Model patches: nodes that return a changed MODEL (a clone sharing the weights) or a guider.

Noise-schedule overrides (ModelSamplingDiscrete, ModelSamplingContinuousEDM), CFG replacements
(RescaleCFG, PerpNeg), UNet up-block patches (FreeU, FreeU_V2) and a per-step inpainting mask
(DifferentialDiffusion). Names, inputs, defaults and ranges are ComfyUI's; the algorithms are written
from their papers.
"""
from __future__ import annotations

from typing import Annotated

import torch

from engine.inputs import Boolean, Combo, Float
from engine.node import node

from .custom_sampling import check_conditioning
from .sampling.custom import Guider as GuiderValue
from .sampling.guiders import perp_neg
from .sampling.model_sampling import ContinuousEDMSchedule, DiscreteSchedule, LCMSchedule, _bcast
from .types import Conditioning, Guider, Model

_DISCRETE = {"eps": "epsilon", "v_prediction": "v_prediction", "x0": "x0"}


@node("ModelSamplingDiscrete", category="advanced/model")
def model_sampling_discrete(model: Model, sampling: Annotated[str, Combo(["eps", "v_prediction", "lcm", "x0"])],
                            zsnr: Annotated[bool, Boolean(False)]) -> Model:
    """Sample the model as an eps / v / x0 / LCM model, optionally with a zero-terminal-SNR schedule."""
    schedule: DiscreteSchedule
    if sampling == "lcm":
        schedule = LCMSchedule(zsnr=zsnr)
    elif sampling in _DISCRETE:
        schedule = DiscreteSchedule(prediction_type=_DISCRETE[sampling], zsnr=zsnr)
    else:
        raise ValueError("ModelSamplingDiscrete: input 'sampling' must be one of eps, v_prediction, lcm, x0, "
                         f"got {sampling!r}")
    return model.with_model_sampling(schedule)


_EDM_SIGMA = {"min": 0.0, "max": 1000.0, "step": 0.001, "round": False}


@node("ModelSamplingContinuousEDM", category="advanced/model")
def model_sampling_continuous_edm(model: Model, sampling: Annotated[str, Combo(["v_prediction", "edm", "eps"])],
                                  sigma_max: Annotated[float, Float(120.0, **_EDM_SIGMA)],
                                  sigma_min: Annotated[float, Float(0.002, **_EDM_SIGMA)]) -> Model:
    """Sample on a continuous sigma range (EDM-style models such as CosXL / SDXL-EDM finetunes)."""
    if not sigma_min > 0:
        raise ValueError(f"ModelSamplingContinuousEDM: input 'sigma_min' must be greater than 0, got {sigma_min}")
    if not sigma_max > sigma_min:
        raise ValueError(f"ModelSamplingContinuousEDM: input 'sigma_max' ({sigma_max}) must be greater than "
                         f"sigma_min ({sigma_min})")
    prediction = {"v_prediction": "v_prediction", "edm": "edm", "eps": "epsilon"}[sampling]
    sigma_data = 0.5 if sampling == "edm" else 1.0
    return model.with_model_sampling(ContinuousEDMSchedule(prediction, sigma_min, sigma_max, sigma_data))


def rescale_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, x: torch.Tensor, sigma: torch.Tensor,
                multiplier: float) -> torch.Tensor:
    """Lin et al. 2023, Sec. 3.4 (Alg. 2): CFG computed on v-predictions, rescaled so its per-sample
    standard deviation matches the positive prediction's, blended with plain CFG by `multiplier`."""
    s = _bcast(sigma, x)
    root = (s * s + 1.0) ** 0.5
    x_vp = x / (s * s + 1.0)
    v_cond = (x_vp - cond) * root / s
    v_uncond = (x_vp - uncond) * root / s
    v_cfg = v_uncond + scale * (v_cond - v_uncond)
    dims = tuple(range(1, x.ndim))
    v_rescaled = v_cfg * (v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    v_final = multiplier * v_rescaled + (1.0 - multiplier) * v_cfg
    return x_vp - v_final * s / root


@node("RescaleCFG", category="advanced/model")
def rescale_cfg_node(model: Model, multiplier: Annotated[float, Float(0.7, min=0.0, max=1.0, step=0.01)]) -> Model:
    """Rescale classifier-free guidance (against over-exposure at high CFG, for v-prediction/zsnr models)."""
    def cfg_function(cond, uncond, scale, x, sigma):
        return rescale_cfg(cond, uncond, scale, x, sigma, multiplier)
    return model.with_patches(cfg_function=cfg_function)


# ---------------------------------------------------------------------------------------- FreeU

def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred low-frequency square (2 threshold wide) of x's 2-D spectrum by `scale`."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones(freq.shape, device=x.device)
    ch, cw = h // 2, w // 2
    mask[..., max(ch - threshold, 0):ch + threshold, max(cw - threshold, 0):cw + threshold] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def _model_channels(model) -> int:
    channels = getattr(getattr(model.unet, "config", None), "block_out_channels", None)
    if not channels:
        raise ValueError("FreeU: input 'model' has no UNet block channels (not a UNet model)")
    return int(channels[0])


def _freeu(model, b1: float, b2: float, s1: float, s2: float, v2: bool):
    """Si et al. 2024 (FreeU): scale half of the backbone features of the two deepest decoder stages
    (channel counts 4x and 2x the first stage's) by b, and damp the low frequencies of their skip
    features by s. FreeU_V2 scales by 1 + (b - 1) * the min-max normalised channel mean instead."""
    base = _model_channels(model)
    factors = {base * 4: (b1, s1), base * 2: (b2, s2)}

    def patch(h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = factors.get(int(h.shape[1]))
        if factor is None:
            return h, skip
        b, s = factor
        half = h.shape[1] // 2
        if v2:
            mean = h.mean(1, keepdim=True)
            flat = mean.reshape(mean.shape[0], -1)
            lo = flat.min(dim=-1).values.reshape(-1, 1, 1, 1)
            hi = flat.max(dim=-1).values.reshape(-1, 1, 1, 1)
            mean = (mean - lo) / (hi - lo)
            h[:, :half] = h[:, :half] * ((b - 1) * mean + 1)
        else:
            h[:, :half] = h[:, :half] * b
        return h, fourier_filter(skip, threshold=1, scale=s)

    return model.with_patches(output_block_patches=(patch,))


_FREEU = {"min": 0.0, "max": 10.0, "step": 0.01}


@node("FreeU", category="model_patches/unet")
def freeu(model: Model, b1: Annotated[float, Float(1.1, **_FREEU)], b2: Annotated[float, Float(1.2, **_FREEU)],
          s1: Annotated[float, Float(0.9, **_FREEU)], s2: Annotated[float, Float(0.2, **_FREEU)]) -> Model:
    """FreeU: reweight the UNet decoder's backbone and skip features (no training, no extra cost)."""
    return _freeu(model, b1, b2, s1, s2, v2=False)


@node("FreeU_V2", category="model_patches/unet")
def freeu_v2(model: Model, b1: Annotated[float, Float(1.3, **_FREEU)], b2: Annotated[float, Float(1.4, **_FREEU)],
             s1: Annotated[float, Float(0.9, **_FREEU)], s2: Annotated[float, Float(0.2, **_FREEU)]) -> Model:
    """FreeU v2: the backbone scale follows each position's normalised feature mean."""
    return _freeu(model, b1, b2, s1, s2, v2=True)


# ---------------------------------------------------------------------------------------- Perp-Neg

@node("PerpNeg", category="_for_testing", deprecated=True)
def perp_neg_node(model: Model, empty_conditioning: Conditioning,
                  neg_scale: Annotated[float, Float(1.0, min=0.0, max=100.0, step=0.01)]) -> Model:
    """Perp-Neg on KSampler's CFG: push only away from the part of the negative prompt that does not
    overlap the positive one (deprecated in ComfyUI in favour of PerpNegGuider)."""
    check_conditioning("PerpNeg", empty_conditioning=empty_conditioning)
    return model.with_patches(guider=("perpneg", {"empty": empty_conditioning}, {"neg_scale": neg_scale}))


@node("PerpNegGuider", category="_for_testing")
def perp_neg_guider(model: Model, positive: Conditioning, negative: Conditioning, empty_conditioning: Conditioning,
                    cfg: Annotated[float, Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)],
                    neg_scale: Annotated[float, Float(1.0, min=0.0, max=100.0, step=0.01)]) -> Guider:
    """A guider applying Perp-Neg (Armandpour et al. 2023) against an empty-prompt prediction."""
    check_conditioning("PerpNegGuider", positive=positive, negative=negative, empty_conditioning=empty_conditioning)
    return GuiderValue(model, {"positive": positive, "negative": negative, "empty": empty_conditioning}, cfg,
                       "perpneg", {"neg_scale": neg_scale})


# ---------------------------------------------------------------------------------------- masks

@node("DifferentialDiffusion", category="_for_testing")
def differential_diffusion(model: Model,
                           strength: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.01)] | None = 1.0) -> Model:
    """Differential Diffusion (Levin & Fried 2023): a soft inpainting mask becomes a per-step change map,
    each pixel regenerated only once sampling has progressed past its mask value."""
    schedule_of = model.sampling_schedule
    amount = 1.0 if strength is None else float(strength)

    def mask_function(sigma: torch.Tensor, mask: torch.Tensor, step_sigmas: torch.Tensor | None) -> torch.Tensor:
        schedule = schedule_of()
        if step_sigmas is None or step_sigmas.numel() == 0:
            return mask
        sigma_to = max(float(schedule.sigma_min), float(step_sigmas[-1]))
        ts_from = float(schedule.timestep(step_sigmas[0].double()))
        ts_to = float(schedule.timestep(torch.tensor(sigma_to, dtype=torch.float64)))
        now = float(schedule.timestep(sigma.reshape(-1)[0].double()))
        threshold = (now - ts_to) / (ts_from - ts_to) if ts_from != ts_to else 0.0
        binary = (mask >= threshold).to(mask.dtype)
        return binary if amount >= 1.0 else amount * binary + (1.0 - amount) * mask

    return model.with_patches(denoise_mask_function=mask_function)


__all__ = ["fourier_filter", "perp_neg", "rescale_cfg"]


@node("TorchCompileModel", category="_for_testing", experimental=True)
def torch_compile_model(model: Model, backend: Annotated[str, Combo(["inductor", "cudagraphs"])]) -> Model:
    """The model with its UNet wrapped in torch.compile (compiled on first use; each new image size
    compiles again). inductor needs a C++ compiler on the CPU and Triton on CUDA."""
    from .models.speed import compile_unet

    if backend == "cudagraphs" and not torch.cuda.is_available():
        raise ValueError("TorchCompileModel: input 'backend' cudagraphs needs a CUDA GPU; use inductor")
    if not hasattr(model, "with_unet"):
        raise ValueError(f"TorchCompileModel: input 'model' ({type(model).__name__}) has no UNet to compile")
    return model.with_unet(compile_unet(model.unet, backend))
