"""Classifier-free guidance over ComfyUI CONDITIONING lists, as a denoiser for the samplers.

CONDITIONING is ``[[cond_tensor [1|B, T, D], {options}], ...]``. Every entry predicts on its area
(whole latent by default), weighted by ``strength`` (x ``mask`` x ``mask_strength``; area edges are
feathered when no mask is given); overlapping predictions are averaged by their summed weights.
Entries whose shapes agree (cond and uncond alike) run as one batched ``apply_model`` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F

from ..models.inpaint import model_concat
from .model_sampling import DiscreteSchedule, _bcast

ApplyModel = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]
Conditioning = Sequence[Sequence[Any]]

_FEATHER = 8  # latent pixels over which an area's inner edges fade in (ComfyUI's value)
_MAX_PAD_RATIO = 4  # token lengths are repeat-padded to their LCM only if it is at most this many times the shortest


@dataclass
class CondEntry:
    """One conditioning entry resolved against a latent shape."""

    context: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor | None  # [B, P]
    size_cond: torch.Tensor | None  # [B, 6]
    control: Any
    area: tuple[int, int, int, int] | None  # (h, w, y, x), clipped to the latent
    strength: float
    mask: torch.Tensor | None  # [B, h, w] at latent resolution, already times mask_strength
    sigma_start: float | None  # inactive while sigma > sigma_start
    sigma_end: float | None  # inactive while sigma < sigma_end
    options: dict[str, Any] = field(default_factory=dict)
    # [B, 9, h, w] extra input of inpainting / InstructPix2Pix models; see models/inpaint.py
    concat: torch.Tensor | None = None
    # unCLIPConditioning entries ({"clip_vision_output", "strength", "noise_augmentation"}); the model turns
    # them into its class / pooled input (models/unclip.py), as only it knows its noise augmentor.
    unclip: list | None = None
    # Per-device copies and per-shape weights, built on first use: the sampler calls the denoiser with the
    # same entries every step, so nothing here is rebuilt or re-uploaded after the first step.
    cache: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(context, pooled, size_cond) on ``device`` (dtypes unchanged: the model casts as it needs)."""
        key = ("tensors", device)
        hit = self.cache.get(key)
        if hit is None:
            hit = tuple(None if t is None else t.to(device) for t in (self.context, self.pooled, self.size_cond))
            self.cache[key] = hit
        return hit


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat (or cut) the leading dim to ``batch`` (ComfyUI's repeat_to_batch_size)."""
    if t.shape[0] == batch:
        return t
    reps = math.ceil(batch / t.shape[0])
    return t.repeat((reps,) + (1,) * (t.ndim - 1))[:batch]


def prepare_mask(mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """A noise_mask of shape [H, W], [B, H, W] or [B, 1, H, W] at any resolution -> [B, C, h, w] in 0..1."""
    b, c, h, w = latent_shape[0], latent_shape[1], latent_shape[-2], latent_shape[-1]
    m = mask.float().reshape((-1, 1) + tuple(mask.shape[-2:]))
    if tuple(m.shape[-2:]) != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return _to_batch(m, b).expand(b, c, h, w).clamp(0, 1)


def _mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(h, w, y, x) bounding box of a mask's non-zero region, at least 8x8 (ComfyUI set_area_to_bounds)."""
    nz = torch.nonzero(mask.abs().amax(dim=0) > 0)
    if nz.numel() == 0:
        return (8, 8, 0, 0)
    y0, x0 = nz.min(dim=0).values.tolist()
    y1, x1 = nz.max(dim=0).values.tolist()
    return (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)


def _resolve_area(area: Sequence[Any], h: int, w: int) -> tuple[int, int, int, int]:
    if len(area) == 5 and area[0] == "percentage":
        _, ph, pw, py, px = area
        area = (max(1, round(ph * h)), max(1, round(pw * w)), round(py * h), round(px * w))
    ah, aw, ay, ax = (int(v) for v in area)
    ay, ax = min(max(ay, 0), h - 1), min(max(ax, 0), w - 1)
    return (max(1, min(ah, h - ay)), max(1, min(aw, w - ax)), ay, ax)


def resolve_conditioning(
    conditioning: Conditioning, schedule: DiscreteSchedule, latent_shape: Sequence[int],
    *, latent_image: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
) -> list[CondEntry]:
    """Turn a CONDITIONING list into entries with areas, masks, SDXL size conds and sigma ranges resolved.

    ``latent_image``/``noise_mask`` are the sampler's, the inpainting models' default extra input."""
    b, h, w = latent_shape[0], latent_shape[-2], latent_shape[-1]
    entries = []
    for item in conditioning:
        tensor, opts = item[0], dict(item[1]) if len(item) > 1 and item[1] is not None else {}
        context = _to_batch(tensor, b)
        pooled = opts.get("pooled_output")
        size_cond = None
        if pooled is not None:
            pooled = _to_batch(pooled.reshape(pooled.shape[0], -1), b)
            width = opts.get("width", w * 8)
            height = opts.get("height", h * 8)
            vals = [
                height,
                width,
                opts.get("crop_h", 0),
                opts.get("crop_w", 0),
                opts.get("target_height", height),
                opts.get("target_width", width),
            ]
            if "aesthetic_score" in opts:
                # SDXL refiner: original size, crop and aesthetic score instead of the target size
                vals = vals[:4] + [opts["aesthetic_score"]]
            size_cond = torch.tensor([float(v) for v in vals]).repeat(b, 1)
        mask = opts.get("mask")
        area = opts.get("area")
        if mask is not None:
            m = mask.float()
            if m.ndim == 2:
                m = m.unsqueeze(0)
            if tuple(m.shape[-2:]) != (h, w):
                m = F.interpolate(m.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
            if opts.get("set_area_to_bounds", False):
                area = _mask_bounds(m)
            mask = _to_batch(m, b) * float(opts.get("mask_strength", 1.0))
        start, end = opts.get("start_percent"), opts.get("end_percent")
        entries.append(
            CondEntry(
                context=context,
                pooled=pooled,
                size_cond=size_cond,
                control=opts.get("control"),
                area=_resolve_area(area, h, w) if area is not None else None,
                strength=float(opts.get("strength", 1.0)),
                mask=mask,
                sigma_start=schedule.percent_to_sigma(start) if start is not None and start > 0 else None,
                sigma_end=schedule.percent_to_sigma(end) if end is not None and end < 1 else None,
                options=opts,
                concat=model_concat(opts, latent_image, noise_mask, latent_shape),
                unclip=list(opts["unclip_conditioning"]) if opts.get("unclip_conditioning") else None,
            )
        )
    return entries


def _weights(entry: CondEntry, like: torch.Tensor, full_h: int, full_w: int) -> torch.Tensor | None:
    """Per-pixel weight of an entry over its area ([B, C, h, w]); None means a uniform 1.

    Cached on the entry per (shape, device, dtype): the result only depends on those and the entry.
    Callers must not modify it in place.
    """
    key = ("weights", tuple(like.shape), like.device, like.dtype, full_h, full_w)
    if key not in entry.cache:
        entry.cache[key] = _build_weights(entry, like, full_h, full_w)
    return entry.cache[key]


def _build_weights(entry: CondEntry, like: torch.Tensor, full_h: int, full_w: int) -> torch.Tensor | None:
    has_area = entry.area is not None and (entry.area[0], entry.area[1]) != (full_h, full_w)
    if entry.mask is None and not has_area and entry.strength == 1.0:
        return None
    mult = torch.full_like(like, entry.strength)
    if entry.mask is not None:
        m = entry.mask.to(like.device, like.dtype)
        if entry.area is not None:
            ah, aw, ay, ax = entry.area
            m = m[:, ay : ay + ah, ax : ax + aw]
        mult = mult * m.unsqueeze(1)
    elif entry.area is not None:
        ah, aw, ay, ax = entry.area
        # fade in over the edges that lie inside the latent, so areas blend without seams
        for dim, start, size, full in ((2, ay, ah, full_h), (3, ax, aw, full_w)):
            rr = min(_FEATHER, mult.shape[dim] // 4)
            for t in range(rr):
                f = (t + 1) / rr
                if start != 0:
                    mult.narrow(dim, t, 1).mul_(f)
                if start + size < full:
                    mult.narrow(dim, size - 1 - t, 1).mul_(f)
    return mult


def _crop(t: torch.Tensor, area: tuple[int, int, int, int] | None) -> torch.Tensor:
    if area is None:
        return t
    ah, aw, ay, ax = area
    return t[:, :, ay : ay + ah, ax : ax + aw]


@dataclass
class _Job:
    which: int  # 0 = cond, 1 = uncond
    entry: CondEntry
    x: torch.Tensor  # the area of the noisy latent, un-scaled
    mult: torch.Tensor | None


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def _token_chunks(jobs: list[_Job]) -> list[list[_Job]]:
    """Split a shape-compatible group so every chunk can be repeat-padded to one token length."""
    jobs = sorted(jobs, key=lambda j: j.entry.context.shape[1])
    chunks: list[list[_Job]] = []
    for job in jobs:
        if chunks:
            lens = [j.entry.context.shape[1] for j in chunks[-1]] + [job.entry.context.shape[1]]
            if _lcm(lens) <= _MAX_PAD_RATIO * min(lens):
                chunks[-1].append(job)
                continue
        chunks.append([job])
    return chunks


class CFGDenoiser:
    """``denoiser(x, sigma) -> denoised`` with CFG, area/mask composition and optional inpainting."""

    def __init__(
        self,
        apply_model: ApplyModel,
        schedule: DiscreteSchedule,
        positive: Conditioning,
        negative: Conditioning,
        cfg: float,
        *,
        latent_shape: Sequence[int],
        noise_mask: torch.Tensor | None = None,
        latent_image: torch.Tensor | None = None,
        seed: int = 0,
        noise: torch.Tensor | None = None,
    ) -> None:
        self.apply_model = apply_model
        self.schedule = schedule
        self.cfg = float(cfg)
        self.latent_shape = tuple(latent_shape)
        self.seed = int(seed)
        concat_src = {"latent_image": latent_image, "noise_mask": noise_mask}
        self.positive = resolve_conditioning(positive, schedule, latent_shape, **concat_src)
        self.negative = resolve_conditioning(negative, schedule, latent_shape, **concat_src)
        self._share_control_with_uncond()
        self.skip_uncond = math.isclose(self.cfg, 1.0)
        # CFG++ protocol (see _common.uncond_getter): a sampler sets need_uncond = True, which forces the
        # negative pass even at cfg 1 (ComfyUI's disable_cfg1_optimization), and after every call reads
        # last_uncond: the negative conditioning's denoised estimate from that call, before the inpaint
        # blend (ComfyUI's post-CFG "uncond_denoised"); None when the negative pass was skipped.
        self.need_uncond = False
        self.last_uncond: torch.Tensor | None = None
        # Model patches (nodes/model_patches.py): cfg_function(cond, uncond, cfg, x, sigma) -> denoised
        # replaces the CFG mix; mask_function(sigma, mask, step_sigmas) -> mask reshapes the inpainting
        # mask per step; step_sigmas is the sampler's schedule (set by sample()).
        self.cfg_function: Callable[..., torch.Tensor] | None = None
        self.mask_function: Callable[..., torch.Tensor] | None = None
        self.step_sigmas: torch.Tensor | None = None
        self.model_calls = 0
        # (device, dtype) -> (mask, latent_image, inpaint_noise) on that device; see _inpaint_tensors
        self._inpaint_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # (entry ids of a batched chunk, token length, device) -> the stacked cond tensors for apply_model
        self._chunk_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._has_ranges = any(e.sigma_start is not None or e.sigma_end is not None
                               for e in self.positive + self.negative)
        self.mask = None
        if noise_mask is not None:
            if latent_image is None:
                raise ValueError("noise_mask needs latent_image (the original latent to keep)")
            self.mask = prepare_mask(noise_mask, latent_shape)
            self.latent_image = latent_image
            if noise is None:
                gen = torch.Generator(device="cpu").manual_seed(int(seed))
                noise = torch.randn(tuple(latent_shape), generator=gen, dtype=torch.float32)
            self.inpaint_noise = noise

    def _share_control_with_uncond(self) -> None:
        # ControlNetApply (old) marks control_apply_to_uncond: the negative entries get the same control.
        shared = next(
            (e.control for e in self.positive if e.control is not None and e.options.get("control_apply_to_uncond")),
            None,
        )
        if shared is not None:
            for e in self.negative:
                if e.control is None:
                    e.control = shared

    # -- one model evaluation -------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if self.mask is not None:
            mask, original, inpaint_noise = self._inpaint_tensors(x)
            if self.mask_function is not None:
                mask = self.mask_function(sigma, mask, self.step_sigmas)
            renoised = original + inpaint_noise * _bcast(sigma, x)
            x = x * mask + renoised * (1 - mask)
        out = self.guide(x, sigma)
        if self.mask is not None:
            out = out * mask + original * (1 - mask)
        return out

    def guide(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided denoised estimate at (x, sigma), before any inpainting blend: CFG of the positive
        and negative predictions. Other guiders (nodes/sampling/guiders.py) combine other predictions."""
        cond, uncond = self.predict(x, sigma, skip_uncond=self.skip_uncond and not self.need_uncond)
        self.last_uncond = uncond
        if uncond is None:
            return cond
        if self.cfg_function is not None:
            return self.cfg_function(cond, uncond, self.cfg, x, sigma)
        return uncond + (cond - uncond) * self.cfg

    def _inpaint_tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inpainting mask, original latent and re-noise noise on x's device/dtype, moved once."""
        key = (x.device, x.dtype)
        hit = self._inpaint_cache.get(key)
        if hit is None:
            assert self.mask is not None  # called only when inpainting, which set all three
            hit = (self.mask.to(x.device, x.dtype), self.latent_image.to(x.device, x.dtype),
                   self.inpaint_noise.to(x.device, x.dtype))
            self._inpaint_cache[key] = hit
        return hit

    def predict(
        self, x: torch.Tensor, sigma: torch.Tensor, skip_uncond: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Denoised predictions for the positive and (unless skip_uncond) negative conditioning."""
        sides = [self.positive] if skip_uncond else [self.positive, self.negative]
        preds = self.predict_sides(x, sigma, sides)
        return preds[0], (None if skip_uncond else preds[1])

    def predict_sides(self, x: torch.Tensor, sigma: torch.Tensor,
                      sides: Sequence[list[CondEntry]]) -> list[torch.Tensor]:
        """One denoised prediction per list of entries, batched into as few model calls as possible."""
        # reading sigma back to the host syncs a GPU, so only do it when an entry has a timestep range
        s = float(sigma.max()) if self._has_ranges else 0.0
        full_h, full_w = x.shape[-2], x.shape[-1]
        jobs: list[_Job] = []
        for which, entries in enumerate(sides):
            for e in entries:
                if e.sigma_start is not None and s > e.sigma_start:
                    continue
                if e.sigma_end is not None and s < e.sigma_end:
                    continue
                if e.area is None:
                    xa = x
                else:
                    ah, aw, ay, ax = e.area
                    xa = x[:, :, ay : ay + ah, ax : ax + aw]
                jobs.append(_Job(which, e, xa, _weights(e, xa, full_h, full_w)))

        # group by everything that must agree to share a forward pass
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            e = job.entry
            key = (
                tuple(job.x.shape),
                e.context.shape[2],
                None if e.pooled is None else tuple(e.pooled.shape),
                None if e.size_cond is None else e.size_cond.shape[1],
                e.concat is None,
                id(e.control),
                e.unclip is None,
                id(e.options["gligen"][1]) if e.options.get("gligen") else None,
            )
            groups.setdefault(key, []).append(job)
        results: list[list[tuple[_Job, torch.Tensor]]] = [[] for _ in sides]
        for group in groups.values():
            for chunk in _token_chunks(group):
                outs = self._run_fitting(chunk, sigma)
                for job, den in zip(chunk, outs):
                    results[job.which].append((job, den))
        return [self._combine(r, x) for r in results]

    def _chunk_conds(self, chunk: list[_Job], device: torch.device) -> dict[str, torch.Tensor]:
        """context (repeat-padded to one token length), pooled and size_cond of a chunk, stacked on device.

        Cached per chunk composition: the same entries batch together every step.
        """
        length = _lcm([j.entry.context.shape[1] for j in chunk])
        key = (tuple(id(j.entry) for j in chunk), length, device)
        hit = self._chunk_cache.get(key)
        if hit is not None:
            return hit
        parts = [j.entry.tensors_on(device) for j in chunk]
        ctx = [c if c.shape[1] == length else c.repeat(1, length // c.shape[1], 1) for c, _, _ in parts]
        hit = {"context": torch.cat(ctx) if len(ctx) > 1 else ctx[0]}
        if chunk[0].entry.pooled is not None:
            hit["pooled"] = torch.cat(cast("list[torch.Tensor]", [p for _, p, _ in parts]))
            hit["size_cond"] = torch.cat(cast("list[torch.Tensor]", [sc for _, _, sc in parts]))
        if chunk[0].entry.unclip is not None:
            hit["unclip"] = [j.entry.unclip for j in chunk]  # type: ignore[assignment]  # one list per job
        if chunk[0].entry.concat is not None:
            # entries batch together only with the same composition, so each of the chunk has a concat too
            hit["concat"] = torch.cat([_crop(cast(torch.Tensor, j.entry.concat), j.entry.area).to(device)
                                       for j in chunk])
        gligen = chunk[0].entry.options.get("gligen")
        if gligen:
            # ("position", GligenHandle, boxes): boxes are normalised by each job's (area's) latent size
            per_job = [gligen[1].inputs_for(j.entry.options["gligen"][2], j.x.shape[0], j.x.shape[-2], j.x.shape[-1],
                                            device, torch.float32) for j in chunk]
            hit["gligen"] = (gligen[1], {k: torch.cat([p[k] for p in per_job]) for k in per_job[0]})  # type: ignore[assignment]
        self._chunk_cache[key] = hit
        return hit

    # The most entries one model call held without running out of memory (None: no limit seen yet).
    max_batch: int | None = None

    def _run_fitting(self, chunk: list[_Job], sigma: torch.Tensor) -> list[torch.Tensor]:
        """cond and uncond in one call while memory allows; a call that runs out of memory is split in
        halves, and later steps start from the size that fit, as ComfyUI batches by free memory."""
        limit = self.max_batch
        if limit is not None and len(chunk) > limit:
            return [d for i in range(0, len(chunk), limit) for d in self._run_fitting(chunk[i:i + limit], sigma)]
        try:
            return self._run(chunk, sigma)
        except Exception as error:
            from ..models.memory import is_out_of_memory
            if len(chunk) < 2 or not is_out_of_memory(error):
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(chunk) // 2
        self.max_batch = half
        return self._run_fitting(chunk[:half], sigma) + self._run_fitting(chunk[half:], sigma)

    def _run(self, chunk: list[_Job], sigma: torch.Tensor) -> list[torch.Tensor]:
        n = len(chunk)
        x_in = torch.cat([j.x for j in chunk]) if n > 1 else chunk[0].x
        sig_in = sigma.repeat(n)
        cond: dict[str, Any] = dict(self._chunk_conds(chunk, x_in.device))
        cond["cond_or_uncond"] = [j.which for j in chunk]
        cond["sigma"] = sig_in
        if "unclip" in cond:
            cond["seed"] = self.seed
        first = chunk[0].entry
        if first.control is not None:
            cond["control"] = first.control
        timestep = self.schedule.timestep(sig_in)
        self.model_calls += 1
        raw = self.apply_model(self.schedule.calculate_input(sig_in, x_in), timestep, cond)
        den = self.schedule.calculate_denoised(sig_in, raw, x_in)
        return list(den.chunk(n)) if n > 1 else [den]

    @staticmethod
    def _combine(results: list[tuple[_Job, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
        if len(results) == 1 and results[0][0].entry.area is None and results[0][0].mult is None:
            return results[0][1]  # the common case: one full-size entry, no weighting
        total = torch.zeros_like(x)
        weight = torch.full_like(x, 1e-37)  # uncovered pixels come out as 0, as in ComfyUI
        for job, den in results:
            if job.entry.area is None:
                sl = (slice(None), slice(None), slice(None), slice(None))
            else:
                ah, aw, ay, ax = job.entry.area
                sl = (slice(None), slice(None), slice(ay, ay + ah), slice(ax, ax + aw))
            if job.mult is None:
                total[sl] += den
                weight[sl] += 1.0
            else:
                total[sl] += den * job.mult
                weight[sl] += job.mult
        return total / weight


# The sampler-facing denoiser ``(x, sigma[B]) -> denoised``. ``apply_model(x_in, timestep[B], cond) -> eps|v``
# gets c_in-scaled input; ``cond`` holds ``context``, ``pooled`` + ``size_cond`` (SDXL, only when the entry
# has pooled_output), ``control`` (passthrough), ``cond_or_uncond`` (0/1 per stacked chunk of the batch) and
# ``sigma``, ``unclip`` + ``seed`` (one unCLIPConditioning list per stacked chunk, when the entries have them),
# and ``concat`` (the [B, 9, h, w] extra input of inpainting and InstructPix2Pix models, when
# the entry or the sampler has a mask or a concat image; a model takes the channels it needs, if any). With
# ``noise_mask`` (1 = regenerate) the unmasked region is held at ``latent_image`` re-noised
# with ``noise`` (drawn from ``seed`` when not given).
make_denoiser = CFGDenoiser
