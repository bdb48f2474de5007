"""Cheap latent previews: a per-pixel linear map from latent channels to RGB (no VAE).

The factors are the widely used latent->RGB least-squares fits for SD1.x and SDXL latents (as in
ComfyUI's latent2rgb previewer). They apply to latents in model space (the raw VAE latent a LATENT
holds, taken through the model's latent format), which is what the sampler's x0 callback provides,
as in ComfyUI's previewers.
"""

from __future__ import annotations

import torch
from PIL import Image

# rows: latent channel 0..3; columns: R, G, B
LATENT_RGB_FACTORS: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd1": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
}
LATENT_RGB_FACTORS["sd2"] = LATENT_RGB_FACTORS["sd1"]  # same VAE
# SD3 / SD3.5: 16 latent channels (the same fit ComfyUI's previewer uses)
LATENT_RGB_FACTORS["sd3"] = (
    [
        [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
        [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
        [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
        [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
        [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
        [-0.1448, -0.1463, -0.1189],
    ],
    [0.2394, 0.2135, 0.1925],
)


def latent_to_rgb_tensor(latent: torch.Tensor, arch: str = "sd1") -> torch.Tensor:
    """[C, h, w] or [B, C, h, w] (first image used) -> uint8 [h, w, 3] on the CPU."""
    if arch not in LATENT_RGB_FACTORS:
        raise ValueError(f"no latent->RGB factors for arch {arch!r}; known: {sorted(LATENT_RGB_FACTORS)}")
    x = latent.detach()
    if x.ndim == 4:
        x = x[0]
    factors, bias = LATENT_RGB_FACTORS[arch]
    if x.ndim != 3 or x.shape[0] != len(factors):
        raise ValueError(f"expected a {len(factors)}-channel latent [C,h,w] or [B,C,h,w], got {tuple(latent.shape)}")
    w = torch.tensor(factors, dtype=torch.float32, device=x.device)
    b = torch.tensor(bias, dtype=torch.float32, device=x.device)
    rgb = torch.einsum("chw,cr->hwr", x.float(), w) + b  # roughly in [-1, 1]
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def latent_to_rgb(latent: torch.Tensor, arch: str = "sd1") -> Image.Image:
    """A small RGB preview (latent resolution, i.e. 1/8 of the image) of a model-space latent."""
    return Image.fromarray(latent_to_rgb_tensor(latent, arch).numpy(), mode="RGB")
