"""What the VAE socket carries: a diffusers AutoencoderKL with ComfyUI's image/latent conventions.

Images are `[B, H, W, C]` float in 0..1 (channels past the third are ignored). Latents returned by
`encode` and accepted by `decode` are the raw VAE latents (the encoder distribution's mode), as in
ComfyUI's LATENT; the diffusion model's latent format (scale, shift) is applied by sampling.

Images whose sides are not multiples of 8 are center-cropped to the nearest smaller multiple
(as ComfyUI does). Out-of-memory during decode/encode falls back to smaller batches, then to tiles.

Batches run in chunks of about CHUNK_PIXELS output pixels and tiles one at a time, with an interrupt
check and a progress report after each: a batch of 4096 stops within one chunk of an interrupt.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from engine import progress

from .memory import ResidentMixin, WeightsHolder, default_device, is_out_of_memory

if TYPE_CHECKING:  # diffusers is imported where models are built: importing it costs seconds
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

log = logging.getLogger(__name__)

CHUNK_PIXELS = 4 * 512 * 512      # full-resolution pixels per chunk (the decoder's activations scale with them)


class VaeHandle(ResidentMixin):
    downscale_ratio = 8

    def __init__(self, vae: nn.Module, device: str | None = None, output_device: str = "cpu",
                 name: str | None = None) -> None:
        self._weights = WeightsHolder({"vae": vae})
        self.load_device = device or default_device()
        # IMAGE and LATENT values are kept on the CPU between nodes, like ComfyUI's intermediate device.
        self.output_device = output_device
        self.name = name
        self._run_lock = threading.Lock()

    @property
    def vae(self) -> AutoencoderKL:
        return cast("AutoencoderKL", self._weights.modules["vae"])

    def clone(self) -> VaeHandle:
        twin = object.__new__(VaeHandle)
        twin.__dict__.update(self.__dict__)
        twin._run_lock = threading.Lock()
        return twin

    # ------------------------------------------------------------------ facts
    @property
    def latent_channels(self) -> int:
        return int(getattr(self.vae.config, "latent_channels", 4))

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", None) or 0.18215)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # ------------------------------------------------------------------ pixels <-> latents
    def crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Center-crop H and W down to multiples of downscale_ratio."""
        r = self.downscale_ratio
        h, w = pixels.shape[1], pixels.shape[2]
        nh, nw = (h // r) * r, (w // r) * r
        if nh == 0 or nw == 0:
            raise ValueError(f"image {w}x{h} is smaller than the VAE's {r}-pixel stride")
        top, left = (h % r) // 2, (w % r) // 2
        return pixels[:, top : top + nh, left : left + nw, :]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,H,W,C]` in 0..1 -> raw VAE latents `[B, latent_channels, H/8, W/8]` (float32)."""
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        pixels = self.crop_pixels(pixels[..., :3])
        out = self._batched(pixels, self._encode_batch, self._encode_tiled, pixels.shape[1] * pixels.shape[2])
        return out.to(self.output_device)

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents `[B,C,h,w]` -> images `[B, 8h, 8w, 3]` in 0..1 (float32, clamped)."""
        samples = _frames_as_batch(samples)
        r = self.downscale_ratio
        out = self._batched(samples, self._decode_batch, self._decode_tiled,
                            samples.shape[-2] * r * samples.shape[-1] * r)
        return out.to(self.output_device)

    @torch.no_grad()
    def decode_tiled(self, samples: torch.Tensor, tile: int = 64, overlap: int = 8) -> torch.Tensor:
        """Decode in latent tiles of `tile` with `overlap`, blended linearly; for images too big to
        decode at once. Exactly equal to `decode` when one tile covers the whole latent."""
        samples = _frames_as_batch(samples)
        with self._run_lock:
            self.ensure_loaded()
            return self._decode_tiled(samples, tile, overlap).to(self.output_device)

    @torch.no_grad()
    def encode_tiled(self, pixels: torch.Tensor, tile: int = 512, overlap: int = 64) -> torch.Tensor:
        """Encode in pixel tiles of `tile` with `overlap`, blended linearly (VAEEncodeTiled)."""
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        pixels = self.crop_pixels(pixels[..., :3])
        with self._run_lock:
            self.ensure_loaded()
            return self._encode_tiled(pixels, tile, overlap).to(self.output_device)

    # ------------------------------------------------------------------ internals
    def _batched(self, x: torch.Tensor, run, tiled, pixels_per_item: int = 1) -> torch.Tensor:
        with self._run_lock:
            self.ensure_loaded()
            batch = max(1, min(x.shape[0], CHUNK_PIXELS // max(pixels_per_item, 1)))
            while True:
                try:
                    return _chunks(x, batch, run)
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    if not is_out_of_memory(exc):
                        raise
                    _free_cache()
                    if batch > 1:
                        batch = max(1, batch // 2)
                        log.warning("VAE ran out of memory; retrying with batch %d", batch)
                        continue
                    log.warning("VAE ran out of memory at batch 1; falling back to tiles")
                    return _chunks(x, 1, tiled)

    def _device(self) -> torch.device:
        return self.compute_device or next(self.vae.parameters()).device

    def _encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self._device(), self.dtype).movedim(-1, 1) * 2.0 - 1.0
        # The distribution's mode, not a sample: encoding the same image twice gives the same latent.
        latent = self.vae.encode(x).latent_dist.mode()
        # Raw VAE latents, as ComfyUI's LATENT: the model's latent format scales them for sampling.
        return latent.float().to(self.output_device)

    def _decode_batch(self, samples: torch.Tensor) -> torch.Tensor:
        z = samples.to(self._device(), torch.float32)
        image = self.vae.decode(z.to(self.dtype)).sample
        if self.dtype != torch.float32 and not bool(torch.isfinite(image).all()):
            # Half-precision SD VAEs overflow on some latents; like ComfyUI, redo in float32 and keep the
            # VAE in float32 from then on (the weights are shared with every handle of this VAE).
            log.warning("VAE decode in %s gave NaN/inf; redoing in float32 and keeping this VAE in float32",
                        self.dtype)
            cast(nn.Module, self.vae).to(torch.float32)
            image = self.vae.decode(z).sample
        return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).to(self.output_device)

    def _decode_tiled(self, samples: torch.Tensor, tile: int = 64, overlap: int = 8) -> torch.Tensor:
        r = self.downscale_ratio
        return _tiled(samples, tile, overlap, r, self._decode_batch, out_channels_last=True)

    def _encode_tiled(self, pixels: torch.Tensor, tile: int = 512, overlap: int = 64) -> torch.Tensor:
        # Work channels-first for tiling, then hand each tile back in the [B,H,W,C] layout.
        x = pixels.movedim(-1, 1)

        def run(t: torch.Tensor) -> torch.Tensor:
            return self._encode_batch(t.movedim(1, -1))

        r = self.downscale_ratio
        return _tiled(x, tile, overlap, 1, run, out_channels_last=False, shrink=r)


def _frames_as_batch(samples: torch.Tensor) -> torch.Tensor:
    """Video-shaped latents [B,C,F,h,w] as a batch of frames [B*F,C,h,w]; others unchanged."""
    if samples.ndim != 5:
        return samples
    b, c, f, h, w = samples.shape
    return samples.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _chunks(x: torch.Tensor, batch: int, run) -> torch.Tensor:
    """`run` over `x` in chunks of `batch`; an interrupt is honoured between chunks. Progress is reported
    only when there is more than one chunk (a single decode shows no bar)."""
    total = -(-x.shape[0] // batch)
    parts = []
    for n, i in enumerate(range(0, x.shape[0], batch), start=1):
        progress.check_interrupt()
        parts.append(run(x[i: i + batch]))
        if total > 1:
            progress.report(n, total)
    return torch.cat(parts, dim=0)


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _positions(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, start_fade: int, end_fade: int) -> torch.Tensor:
    """Weights 0..1 that fade in over `start_fade` and out over `end_fade` elements."""
    w = torch.ones(length)
    if start_fade > 0:
        w[:start_fade] = torch.linspace(1.0 / (start_fade + 1), 1.0, start_fade + 1)[:-1]
    if end_fade > 0:
        w[length - end_fade :] = torch.linspace(1.0, 1.0 / (end_fade + 1), end_fade + 1)[1:]
    return w


def _tiled(x: torch.Tensor, tile: int, overlap: int, scale: int, run, out_channels_last: bool,
           shrink: int = 1) -> torch.Tensor:
    """Run `run` on overlapping tiles of channels-first `x` [B,C,H,W] and blend the results.

    The output is `scale` times (or 1/`shrink` of) the input size. Overlaps are linearly
    cross-faded so tile seams do not show."""
    overlap = max(0, min(overlap, tile // 2))
    _, _, h, w = x.shape
    ys, xs = _positions(h, tile, overlap), _positions(w, tile, overlap)
    out = None
    weight = None
    for y0 in ys:
        for x0 in xs:
            progress.check_interrupt()    # tiles of one huge image are the unit of interruption
            th, tw = min(tile, h - y0), min(tile, w - x0)
            piece = run(x[:, :, y0 : y0 + th, x0 : x0 + tw]).float()
            if out_channels_last:
                piece = piece.movedim(-1, 1)
            oy, ox = y0 * scale // shrink, x0 * scale // shrink
            ph, pw = piece.shape[-2], piece.shape[-1]
            if out is None or weight is None:  # set together, on the first tile
                out = torch.zeros(piece.shape[0], piece.shape[1], h * scale // shrink, w * scale // shrink,
                                  device=piece.device)
                weight = torch.zeros(1, 1, out.shape[-2], out.shape[-1], device=piece.device)
            fade = overlap * scale // shrink
            wy = _ramp(ph, fade if y0 > 0 else 0, fade if y0 + th < h else 0)
            wx = _ramp(pw, fade if x0 > 0 else 0, fade if x0 + tw < w else 0)
            mask = (wy[:, None] * wx[None, :]).to(piece.device)
            out[:, :, oy : oy + ph, ox : ox + pw] += piece * mask
            weight[:, :, oy : oy + ph, ox : ox + pw] += mask
    assert out is not None and weight is not None
    out = out / weight.clamp_min(1e-8)
    return out.movedim(1, -1) if out_channels_last else out
