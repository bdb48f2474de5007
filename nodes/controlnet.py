"""ControlNet nodes: load a ControlNet, attach it (with a hint image) to conditionings, and the Canny
edge preprocessor that makes hint images.

ControlNetApply (old), ControlNetApplyAdvanced and ControlNetApplySD3 follow ComfyUI: every
conditioning entry gets a "control" (chained to the one it already had, so several ControlNets add
up), strength 0 is a passthrough, and the old node also applies the control to the negative prompt.
SD3 ControlNets take a VAE (their hint is encoded to latents): the advanced and SD3 nodes pass theirs.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F

from engine.inputs import Combo, Float
from engine.node import node

from .models.controlnet import load_control_handle
from .models.memory import compute_dtype, default_device
from .runtime import model_file_exists, model_file_fingerprint, model_files, runtime
from .types import Conditioning, ControlNet, Image, Model, Vae


@node("ControlNetLoader", category="loaders", display_name="Load ControlNet Model",
      fingerprint=model_file_fingerprint("controlnet", "control_net_name"),
      validate=model_file_exists("controlnet", "control_net_name", "ControlNet"))
def controlnet_loader(control_net_name: Annotated[str, Combo(model_files("controlnet"))]) -> ControlNet:
    """Loads a ControlNet or a T2I-Adapter (original single-file layout or diffusers layout)."""
    path = runtime().folders.require("controlnet", control_net_name)
    dtype = compute_dtype(default_device())   # half precision on CUDA, like the UNet it feeds
    return load_control_handle(path, dtype=dtype)


@node("DiffControlNetLoader", category="loaders", display_name="Load ControlNet Model (diff)",
      fingerprint=model_file_fingerprint("controlnet", "control_net_name"),
      validate=model_file_exists("controlnet", "control_net_name", "ControlNet"))
def diff_controlnet_loader(model: Model,
                           control_net_name: Annotated[str, Combo(model_files("controlnet"))]) -> ControlNet:
    """Loads a ControlNet stored as differences to a diffusion model's weights (the given model's are
    added back); plain ControlNets and T2I-Adapters load as with Load ControlNet Model."""
    path = runtime().folders.require("controlnet", control_net_name)
    return load_control_handle(path, dtype=compute_dtype(default_device()), base_unet=model.unet)


@node("ControlNetApply", category="conditioning/controlnet", display_name="Apply ControlNet (OLD)",
      deprecated=True)
def controlnet_apply(conditioning: Conditioning, control_net: ControlNet, image: Image,
                     strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)]) -> Conditioning:
    """Guides sampling with a ControlNet and a hint image; also applied to the negative prompt."""
    if strength == 0:
        return conditioning
    if getattr(control_net, "needs_vae", False):
        raise ValueError("ControlNetApply: this SD3 ControlNet needs a VAE for its hint image, which this node has "
                         "no input for; use Apply Controlnet with VAE (ControlNetApplySD3) and connect its `vae` input")
    out = []
    for cond, opts in conditioning:
        opts = dict(opts)
        opts["control"] = control_net.apply_hint(image, strength, (0.0, 1.0), previous=opts.get("control"))
        opts["control_apply_to_uncond"] = True
        out.append([cond, opts])
    return out


@node("ControlNetApplyAdvanced", category="conditioning/controlnet", display_name="Apply ControlNet",
      output_names=("positive", "negative"))
def controlnet_apply_advanced(positive: Conditioning, negative: Conditioning, control_net: ControlNet,
                              image: Image,
                              strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)],
                              start_percent: Annotated[float, Float(0.0, min=0.0, max=1.0, step=0.001)],
                              end_percent: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.001)],
                              vae: Vae | None = None) -> tuple[Conditioning, Conditioning]:
    """Guides sampling with a ControlNet between two fractions of the schedule. `vae` encodes the hint
    of SD3 ControlNets (which work on latents); the SD1/SD2/SDXL ones work on pixels and ignore it."""
    return _apply_to_both("ControlNetApplyAdvanced", positive, negative, control_net, image, strength,
                          start_percent, end_percent, vae)


@node("ControlNetApplySD3", category="conditioning/controlnet", display_name="Apply Controlnet with VAE",
      output_names=("positive", "negative"))
def controlnet_apply_sd3(positive: Conditioning, negative: Conditioning, control_net: ControlNet, vae: Vae,
                         image: Image,
                         strength: Annotated[float, Float(1.0, min=0.0, max=10.0, step=0.01)],
                         start_percent: Annotated[float, Float(0.0, min=0.0, max=1.0, step=0.001)],
                         end_percent: Annotated[float, Float(1.0, min=0.0, max=1.0, step=0.001)],
                         ) -> tuple[Conditioning, Conditioning]:
    """Guides sampling with a ControlNet whose hint image is VAE-encoded (SD3 / SD3.5 ControlNets);
    other ControlNets work as with Apply ControlNet."""
    return _apply_to_both("ControlNetApplySD3", positive, negative, control_net, image, strength,
                          start_percent, end_percent, vae)


def _apply_to_both(node_name: str, positive: Conditioning, negative: Conditioning, control_net: ControlNet,
                   image: Image, strength: float, start_percent: float, end_percent: float,
                   vae: Vae | None) -> tuple[Conditioning, Conditioning]:
    """Both conditionings get the control (chained to what each entry had); entries that shared a
    previous chain share the new application too."""
    if strength == 0:
        return positive, negative
    extra: dict[str, object] = {}
    if getattr(control_net, "needs_vae", False):
        if vae is None:
            raise ValueError(f"{node_name}: this SD3 ControlNet needs input 'vae' (its hint image is VAE-encoded); "
                             "connect the checkpoint's or a VAELoader's VAE")
        extra["vae"] = vae
    shared: dict[int, tuple[object, object]] = {}   # one application per previous chain
    result = []
    for conditioning in (positive, negative):
        out = []
        for cond, opts in conditioning:
            opts = dict(opts)
            previous = opts.get("control")
            hit = shared.get(id(previous))
            if hit is None:
                app = control_net.apply_hint(image, strength, (start_percent, end_percent), previous=previous,
                                             **extra)
                shared[id(previous)] = hit = (previous, app)   # keeps `previous` alive so ids stay unique
            opts["control"] = hit[1]
            opts["control_apply_to_uncond"] = False
            out.append([cond, opts])
        result.append(out)
    return result[0], result[1]


# ---------------------------------------------------------------------------------------- Canny

def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def canny(image: torch.Tensor, low: float, high: float, kernel_size: int = 5, sigma: float = 1.0,
          eps: float = 1e-6) -> torch.Tensor:
    """Canny edges of `image` [B,C,H,W] in 0..1 -> [B,1,H,W] of 0/1.

    Grey conversion (Rec. 601), 5x5 Gaussian blur (sigma 1), normalised Sobel gradients, magnitude,
    non-maximum suppression along the gradient direction rounded to 45 degrees, double threshold,
    and hysteresis (weak edges survive only when connected to a strong one)."""
    x = image.float()
    if x.shape[1] == 3:
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    elif x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    pad = kernel_size // 2
    blur = _gaussian_kernel(kernel_size, sigma).to(x)[None, None]
    x = F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), blur)

    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8.0
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]
    grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
    gx, gy = grad[:, 0:1], grad[:, 1:2]
    magnitude = torch.sqrt(gx * gx + gy * gy + eps)

    # Direction index 0..7 (multiples of 45 degrees); compare with the neighbours along it.
    direction = (torch.round(torch.atan2(gy, gx) * (180.0 / math.pi) / 45.0) % 8).long()
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]   # (dy, dx) per index
    padded = F.pad(magnitude, (1, 1, 1, 1), mode="constant", value=0.0)
    h, w = magnitude.shape[-2:]

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        return padded[:, :, 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]

    is_max = torch.zeros_like(magnitude, dtype=torch.bool)
    for k, (dy, dx) in enumerate(offsets):
        here = direction == k
        is_max |= here & (magnitude > neighbour(dy, dx)) & (magnitude > neighbour(-dy, -dx))
    magnitude = magnitude * is_max

    strong = magnitude > high
    weak = (magnitude > low) & ~strong
    ring = torch.ones(1, 1, 3, 3, device=x.device)
    while True:
        grown = strong | (weak & (F.conv2d(strong.float(), ring, padding=1) > 0))
        if torch.equal(grown, strong):
            break
        strong = grown
    return strong.float()


@node("Canny", category="image/preprocessors")
def canny_node(image: Image, low_threshold: Annotated[float, Float(0.4, min=0.01, max=0.99, step=0.01)],
               high_threshold: Annotated[float, Float(0.8, min=0.01, max=0.99, step=0.01)]) -> Image:
    """Detects edges (Canny); the result is a black and white image, e.g. a ControlNet hint."""
    edges = canny(image.movedim(-1, 1), low_threshold, high_threshold)
    return edges.repeat(1, 3, 1, 1).movedim(1, -1).cpu()
