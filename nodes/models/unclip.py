"""unCLIP image conditioning: CLIP image embeddings, noise-augmented, as a model's class/pooled input.

unCLIPConditioning puts `{"clip_vision_output", "strength", "noise_augmentation"}` entries in a
conditioning's `unclip_conditioning` list (ComfyUI's shape). At sampling time `unclip_adm` turns them
into one vector per conditioning, as ComfyUI does: each image embedding is normalised with the
augmentor's statistics, noised to level round(999 * noise_augmentation) on a squared-cosine DDPM
schedule, un-normalised, followed by the sinusoidal embedding of that noise level, times the strength;
several embeddings are summed and the sum is augmented once more at `merge` (SD2.1 unCLIP: 0.05,
SDXL: 0). SD2.1 unCLIP models take the whole [1, 2*D] vector as class labels; SDXL ("revision")
takes its first D numbers in place of the pooled text embedding.

The noising is diffusers' (DDPMScheduler.add_noise, get_timestep_embedding), the same maths as
StableUnCLIPImg2ImgPipeline.noise_image_embeddings. Noise comes from the sampler's seed - 10 (ComfyUI's
offset) on a CPU generator; the merge step reuses it rather than drawing unseeded noise, so results
are reproducible.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

MAX_NOISE_LEVEL = 1000
SEED_OFFSET = -10


@cache
def _scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=MAX_NOISE_LEVEL, beta_schedule="squaredcos_cap_v2")


class NoiseAugmentor:
    """Normalise, noise and un-normalise an embedding; `mean`/`std` are [1, D] (zeros/ones when the
    model ships no statistics, as SDXL)."""

    def __init__(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor, noise_level: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import get_timestep_embedding

        x = x.float().reshape(1, -1)
        mean = self.mean.float().to(x.device) if self.mean is not None else torch.zeros_like(x)
        std = self.std.float().to(x.device) if self.std is not None else torch.ones_like(x)
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        level = torch.tensor([int(noise_level)], device=x.device)
        z = _scheduler().add_noise((x - mean) / std, noise, level) * std + mean
        emb = get_timestep_embedding(level, x.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
        return z, emb.to(z.dtype)


def _level(noise_augmentation: float) -> int:
    return round((MAX_NOISE_LEVEL - 1) * float(noise_augmentation))


def unclip_adm(entries: Sequence[dict], augmentor: NoiseAugmentor, *, merge: float = 0.0,
               seed: int = 0) -> torch.Tensor:
    """The [1, 2*D] class vector of an `unclip_conditioning` list (see the module doc)."""
    seed = int(seed) + SEED_OFFSET
    rows = []
    for entry in entries:
        embeds = entry["clip_vision_output"].image_embeds
        for embed in embeds.reshape(-1, embeds.shape[-1]):
            z, emb = augmentor(embed, _level(entry["noise_augmentation"]), seed)
            rows.append(torch.cat([z, emb], dim=1) * float(entry["strength"]))
    if not rows:
        raise ValueError("unclip_conditioning holds no image embeddings")
    if len(rows) == 1:
        return rows[0]
    total = torch.stack(rows).sum(0)
    dim = total.shape[1] // 2
    z, emb = augmentor(total[:, :dim], _level(merge), seed)
    return torch.cat([z, emb], dim=1)


def revision_pooled(entries: Sequence[dict], pooled_dim: int, seed: int = 0) -> torch.Tensor:
    """SDXL revision: the image embedding part of the unCLIP vector stands for the pooled text embedding."""
    adm = unclip_adm(entries, NoiseAugmentor(), seed=seed)
    dim = adm.shape[1] // 2
    if dim != pooled_dim:
        raise ValueError(f"unCLIPConditioning: the CLIP vision model's image embeddings have {dim} numbers, "
                         f"this SDXL model's pooled embedding {pooled_dim} (revision needs the ViT-bigG tower)")
    return adm[:, :dim]
