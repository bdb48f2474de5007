"""Tensor image helpers shared by image and latent nodes: resizing with ComfyUI's method names,
and conversions between IMAGE tensors ([B,H,W,C] 0..1) and PIL images."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

IMAGE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
LATENT_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


def center_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop [B,C,H,W] to the aspect ratio of width x height, around the centre."""
    old_w, old_h = samples.shape[3], samples.shape[2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples[:, :, y:old_h - y, x:old_w - x]


def resize(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize [B,C,H,W] to width x height."""
    if crop == "center":
        samples = center_crop(samples, width, height)
    if method == "lanczos":
        return _lanczos(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method not in ("nearest-exact", "bilinear", "area", "bicubic"):
        raise ValueError(f"unknown upscale method {method!r}")
    return F.interpolate(samples, size=(height, width), mode=method)


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    out = []
    for img in samples:
        arr = img.movedim(0, -1).float().cpu().clamp(0, 1).numpy()
        channels = [PILImage.fromarray(np.clip(arr[..., c] * 255.0, 0, 255).astype(np.uint8))
                    .resize((width, height), PILImage.Resampling.LANCZOS) for c in range(arr.shape[-1])]
        stacked = np.stack([np.asarray(c, dtype=np.float32) / 255.0 for c in channels], axis=0)
        out.append(torch.from_numpy(stacked))
    return torch.stack(out).to(samples.device, samples.dtype)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of vectors along dim 1 (channels), keeping an interpolated norm."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-8), b / nb.clamp_min(1e-8)
    dot = (ua * ub).sum(1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    linear = so.abs() < 1e-4
    wa = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / so.where(~linear, torch.ones_like(so)))
    wb = torch.where(linear, t, torch.sin(t * omega) / so.where(~linear, torch.ones_like(so)))
    return (wa * ua + wb * ub) * (na * (1 - t) + nb * t)


def _bislerp_axis(x: torch.Tensor, new: int, dim: int) -> torch.Tensor:
    old = x.shape[dim]
    pos = (torch.arange(new, device=x.device, dtype=torch.float32) + 0.5) * old / new - 0.5
    pos = pos.clamp(0, old - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=old - 1)
    t = (pos - lo.float())
    a, b = x.index_select(dim, lo), x.index_select(dim, hi)
    shape = [1] * x.dim()
    shape[dim] = new
    return _slerp(a, b, t.view(shape).to(x.dtype))


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize latents by slerp between neighbouring latent vectors (first along rows, then columns),
    which keeps their magnitude better than bilinear interpolation."""
    return _bislerp_axis(_bislerp_axis(samples.float(), width, 3), height, 2).to(samples.dtype)


def keep_aspect(width: int, height: int, old_w: int, old_h: int) -> tuple[int, int]:
    """ComfyUI's rule: 0 in one dimension follows the aspect ratio of the other."""
    if width == 0 and height == 0:
        return old_w, old_h
    if width == 0:
        width = max(1, round(old_w * height / old_h))
    elif height == 0:
        height = max(1, round(old_h * width / old_w))
    return width, height


def tensor_to_pil(image: torch.Tensor) -> PILImage.Image:
    """One [H,W,C] image in 0..1 to a PIL image (C = 1, 3 or 4)."""
    arr = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return PILImage.fromarray(arr)
