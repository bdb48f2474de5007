"""Latent and conditioning nodes from ComfyUI core, called directly (a node is a function)."""
from __future__ import annotations

import pytest
import torch

from nodes import conditioning as C, latent as L


def lat(b=1, c=4, h=8, w=8, value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.full((b, c, h, w), float(value)) if value is not None else torch.randn((b, c, h, w), generator=g)
    return {"samples": s}


def test_latent_composite_pastes_and_feathers_inner_edges():
    dst, src = lat(value=0, h=16, w=16), lat(value=1, h=8, w=8)
    out = L.latent_composite(dst, src, 32, 16, 0)["samples"]
    assert out[0, 0, 2:10, 4:12].eq(1).all() and out[0, 0, :2].eq(0).all() and out[0, 0, :, :4].eq(0).all()
    feathered = L.latent_composite(dst, src, 32, 16, 16)["samples"][0, 0]
    # two latent cells of fade on the inner edges: 1/2 then 1 (a corner multiplies both ramps)
    assert feathered[2, 7].item() == pytest.approx(0.5) and feathered[3, 7].item() == pytest.approx(1.0)
    assert feathered[2, 4].item() == pytest.approx(0.25)
    at_border = L.latent_composite(dst, src, 0, 0, 16)["samples"][0, 0]
    assert at_border[0, 0].item() == pytest.approx(1.0)  # edges on the destination's border are not faded
    assert dst["samples"].eq(0).all()  # inputs are not modified


def test_latent_composite_masked_uses_mask_and_resize():
    dst, src = lat(value=0, h=8, w=8), lat(value=2, h=4, w=4)
    mask = torch.zeros(1, 32, 32)
    mask[:, :16] = 1  # top half of the source
    out = L.latent_composite_masked(dst, src, 8, 8, False, mask)["samples"][0, 0]
    assert out[1, 1].item() == 2 and out[4, 1].item() == 0 and out[0, 0].item() == 0
    full = L.latent_composite_masked(dst, src, 0, 0, True, None)["samples"]
    assert full.eq(2).all()
    with pytest.raises(ValueError, match="source: 16 channels"):
        L.latent_composite_masked(dst, lat(c=16), 0, 0, False, None)


def test_blend_add_subtract_multiply_resize_samples2():
    a, b = lat(value=2), lat(value=1, h=4, w=4)
    assert L.latent_blend(a, b, 0.25)["samples"].allclose(torch.full((1, 4, 8, 8), 1.25))
    assert L.latent_add(a, b)["samples"].eq(3).all()
    assert L.latent_subtract(a, b)["samples"].eq(1).all()
    assert L.latent_multiply(a, -0.5)["samples"].eq(-1).all()


def test_latent_interpolate_keeps_lengths_and_ends():
    a, b = lat(seed=1), lat(seed=2)
    assert L.latent_interpolate(a, b, 1.0)["samples"].allclose(a["samples"], atol=1e-5)
    assert L.latent_interpolate(a, b, 0.0)["samples"].allclose(b["samples"], atol=1e-5)
    mid = L.latent_interpolate(a, b, 0.5)["samples"]
    want = (a["samples"].norm(dim=1) + b["samples"].norm(dim=1)) / 2
    assert mid.norm(dim=1).allclose(want, atol=1e-4)


def test_batches_keep_noise_indices_and_refuse_bad_indices():
    s = lat(b=3)
    part = L.latent_from_batch(s, 1, 5)
    assert part["samples"].shape[0] == 2 and part["batch_index"] == [1, 2]
    assert part["samples"].equal(s["samples"][1:])
    with pytest.raises(ValueError, match=r"batch_index 3 is out of range: the batch has 3"):
        L.latent_from_batch(s, 3, 1)
    rep = L.repeat_latent_batch(part, 2)
    assert rep["samples"].shape[0] == 4 and rep["batch_index"] == [1, 2, 3, 4]
    joined = L.latent_batch(lat(b=2), lat(b=1, h=4, w=4))
    assert joined["samples"].shape == (3, 4, 8, 8) and joined["batch_index"] == [0, 1, 0]
    with pytest.raises(ValueError, match="samples2: 16 channels"):
        L.latent_batch(lat(), lat(c=16))
    with pytest.raises(ValueError, match="samples: not a latent"):
        L.latent_multiply({"noise_mask": torch.ones(1)}, 1.0)


def test_crop_flip_rotate():
    s = {"samples": torch.arange(64.0).reshape(1, 1, 8, 8)}
    crop = L.latent_crop(s, 64, 64, 16, 8)["samples"]
    assert crop.shape == (1, 1, 8, 8) and crop[0, 0, 0, 0].item() == 0  # origin pulled back to keep 8 cells
    big = {"samples": torch.arange(256.0).reshape(1, 1, 16, 16)}
    part = L.latent_crop(big, 64, 64, 32, 16)["samples"]
    assert part.shape == (1, 1, 8, 8) and part[0, 0, 0, 0].item() == 2 * 16 + 4
    assert L.latent_flip(s, "x-axis: vertically")["samples"][0, 0, 0, 0].item() == 56
    assert L.latent_flip(s, "y-axis: horizontally")["samples"][0, 0, 0, 0].item() == 7
    rot = L.latent_rotate(s, "90 degrees")["samples"][0, 0]
    assert rot[0, 0].item() == 56 and rot[0, 7].item() == 0  # clockwise: the left column becomes the top row
    assert L.latent_rotate(s, "none")["samples"].equal(s["samples"])


def cond(tokens=77, width=8, value=1.0, pooled=True):
    opts = {"pooled_output": torch.full((1, width), value)} if pooled else {}
    return [[torch.full((1, tokens, width), value), opts]]


def test_conditioning_set_mask_average_concat():
    mask = torch.zeros(32, 32)
    masked = C.conditioning_set_mask(cond(), mask, 0.7, "mask bounds")
    opts = masked[0][1]
    assert opts["mask"].shape == (1, 32, 32) and opts["mask_strength"] == 0.7 and opts["set_area_to_bounds"]
    avg = C.conditioning_average(cond(value=1.0), cond(tokens=154, value=3.0), 0.25)
    assert avg[0][0].shape == (1, 77, 8) and avg[0][0].allclose(torch.full((1, 77, 8), 2.5))
    assert avg[0][1]["pooled_output"].allclose(torch.full((1, 8), 2.5))
    short = C.conditioning_average(cond(tokens=154), cond(tokens=77, value=3.0), 0.0)[0][0]
    assert short[0, :77].eq(3).all() and short[0, 77:].eq(0).all()  # padded with zeros
    cat = C.conditioning_concat(cond(), cond(tokens=10, value=2.0))
    assert cat[0][0].shape == (1, 87, 8) and cat[0][0][0, 80].eq(2).all()
    with pytest.raises(ValueError, match="conditioning_from: embedding width 16"):
        C.conditioning_concat(cond(), cond(width=16))
    with pytest.raises(ValueError, match="conditioning_from: empty"):
        C.conditioning_average(cond(), [], 0.5)


class _Schedule:
    def percent_to_sigma(self, p):
        return 1.0 - p


def test_set_mask_reaches_the_guidance_weights():
    """A masked conditioning is weighted by its mask (resized to the latent) in the sampler's guidance."""
    from nodes.sampling.guidance import _build_weights, resolve_conditioning
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    entries = resolve_conditioning(C.conditioning_set_mask(cond(width=768), mask, 0.5, "default"),
                                   _Schedule(), (1, 4, 8, 8))
    w = _build_weights(entries[0], torch.zeros(1, 4, 8, 8), 8, 8)
    assert w[0, 0, :, :4].eq(0.5).all() and w[0, 0, :, 4:].eq(0).all()
    bounded = resolve_conditioning(C.conditioning_set_mask(cond(width=768), mask, 1.0, "mask bounds"),
                                   _Schedule(), (1, 4, 16, 16))
    assert bounded[0].area == (16, 8, 0, 0)  # the mask's bounding box, in latent cells
