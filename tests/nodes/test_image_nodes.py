"""Image nodes from ComfyUI core, called directly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from nodes import image as I


def img(b=1, h=8, w=8, value=None, c=3, seed=0):
    if value is not None:
        return torch.full((b, h, w, c), float(value))
    return torch.rand((b, h, w, c), generator=torch.Generator().manual_seed(seed))


def test_scale_to_total_pixels_keeps_aspect_and_steps():
    out = I.image_scale_to_total_pixels(img(h=100, w=200), "bilinear", 0.01, 1)
    assert out.shape[1:3] == (72, 145)  # sqrt(0.01 MiB / 20000 px) of each side
    stepped = I.image_scale_to_total_pixels(img(h=100, w=200), "nearest-exact", 0.01, 16)
    assert stepped.shape[1] % 16 == 0 and stepped.shape[2] % 16 == 0


def test_pad_for_outpaint_grey_border_and_feathered_mask():
    image, mask = I.image_pad_for_outpaint(img(value=1.0), 8, 0, 0, 0, 4)
    assert image.shape == (1, 8, 16, 3) and image[0, :, :8].eq(0.5).all() and image[0, :, 8:].eq(1).all()
    assert mask.shape == (1, 8, 16) and mask[0, :, :8].eq(1).all()
    # inside the original, along the padded (left) side: ((4 - d) / 4)^2 for distance d < 4
    assert mask[0, 0, 8:13].tolist() == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0])
    assert mask[0, :, 12:].eq(0).all()
    _, right = I.image_pad_for_outpaint(img(value=1.0), 0, 0, 8, 0, 4)
    # the far side counts from one past the last column: the last original column is at distance 1
    assert right[0, 0, 4:9].tolist() == pytest.approx([0.0, 0.0625, 0.25, 0.5625, 1.0])


def test_crop_clamps_the_origin_like_comfyui():
    grid = torch.arange(64.0).reshape(1, 8, 8, 1).expand(-1, -1, -1, 3)
    out = I.image_crop(grid, 3, 2, 4, 5)
    assert out.shape == (1, 2, 3, 3) and out[0, 0, 0, 0].item() == 5 * 8 + 4
    edge = I.image_crop(grid, 5, 5, 100, 100)
    assert edge.shape == (1, 1, 1, 3) and edge[0, 0, 0, 0].item() == 63


def test_batch_from_batch_repeat():
    joined = I.image_batch(img(b=2), img(h=4, w=4, c=4, value=0.2))
    assert joined.shape == (3, 8, 8, 4) and joined[2].allclose(torch.full((8, 8, 4), 0.2))
    assert joined[:2, ..., 3].eq(1).all()  # RGB gained an opaque alpha to join RGBA
    batch = img(b=3)
    assert I.image_from_batch(batch, 1, 10).equal(batch[1:])
    with pytest.raises(ValueError, match="batch_index 3 is out of range: the batch has 3 image"):
        I.image_from_batch(batch, 3, 1)
    assert I.repeat_image_batch(img(b=2), 3).shape == (6, 8, 8, 3)


def test_composite_masked_at_offset_with_mask():
    dst, src = img(value=0.0, h=8, w=8), img(value=1.0, h=4, w=4)
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1
    out = I.image_composite_masked(dst, src, 6, 2, False, mask)
    assert out[0, 2, 6].eq(1).all() and out[0, 2, 7].eq(1).all() and out[0, 1, 6].eq(0).all()
    assert out.shape == dst.shape  # the part past the right edge is dropped
    full = I.image_composite_masked(dst, src, 0, 0, True, None)
    assert full.eq(1).all()


@pytest.mark.parametrize("mode,expect", [
    ("normal", 0.8), ("multiply", 0.32), ("screen", 0.88), ("overlay", 0.64),
    ("soft_light", 0.4 + 0.6 * (0.4 ** 0.5 - 0.4)), ("difference", 0.0)])
def test_blend_modes(mode, expect):
    out = I.image_blend(img(value=0.4), img(value=0.8, h=4, w=4), 1.0, mode)
    assert out.shape == (1, 8, 8, 3) and out[0, 0, 0, 0].item() == pytest.approx(expect, abs=1e-5)
    half = I.image_blend(img(value=0.4), img(value=0.8), 0.5, "normal")
    assert half[0, 0, 0, 0].item() == pytest.approx(0.6)


def test_blur_keeps_flat_areas_and_smooths_edges():
    flat = img(value=0.3, h=16, w=16)
    assert I.image_blur(flat, 3, 1.0).allclose(flat, atol=1e-6)
    step = img(value=0.0, h=16, w=16)
    step[:, :, 8:] = 1
    blurred = I.image_blur(step, 2, 1.0)
    assert 0 < blurred[0, 0, 7, 0].item() < 0.5 < blurred[0, 0, 8, 0].item() < 1


def test_sharpen_keeps_flat_areas_and_raises_contrast():
    flat = img(value=0.3, h=16, w=16)
    assert I.image_sharpen(flat, 2, 1.0, 1.0).allclose(flat, atol=1e-5)
    step = img(value=0.4, h=16, w=16)
    step[:, :, 8:] = 0.6
    sharp = I.image_sharpen(step, 1, 1.0, 0.5)
    assert sharp[0, 0, 7, 0].item() < 0.4 and sharp[0, 0, 8, 0].item() > 0.6


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-4"])
def test_quantize_limits_the_palette(dither):
    out = I.image_quantize(img(h=16, w=16, seed=3), 4, dither)
    colours = {tuple(p) for p in (out[0].reshape(-1, 3) * 255).round().int().tolist()}
    assert out.shape == (1, 16, 16, 3) and 1 < len(colours) <= 4


def test_stitch_directions_spacing_and_size_matching():
    a, b = img(value=0.0, h=8, w=8), img(value=1.0, h=4, w=6)
    right = I.image_stitch(a, "right", True, 2, "red", b)
    assert right.shape == (1, 8, 8 + 2 + 12, 3)  # b scaled to height 8 keeps its aspect: width 12
    assert right[0, 0, 8].tolist() == [1.0, 0.0, 0.0] and right[0, 0, 0].eq(0).all()
    left = I.image_stitch(a, "left", False, 0, "black", b)
    assert left.shape == (1, 8, 14, 3) and left[0, 0, 0].eq(0).all() and left[0, 3, 0].eq(1).all()  # centred pad
    white = I.image_stitch(a, "left", False, 3, "white", b)
    assert white.shape == (1, 8, 18, 3) and white[0, 0, 0].eq(1).all()  # white pads white; odd spacing -> 4
    down = I.image_stitch(a, "down", True, 0, "white", b)
    assert down.shape[1:3] == (8 + 5, 8) and down[0, 0, 0].eq(0).all()
    assert I.image_stitch(a, "up", True, 0, "white", None).equal(a)


def test_load_image_output_reads_the_output_folder(sd_env):
    from engine.validation import validate_prompt
    from nodes.runtime import runtime
    registry, _ = sd_env
    out_dir = runtime().output_dir
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[..., 0] = 255
    PILImage.fromarray(arr).save(out_dir / "result_00001_.png")
    assert "result_00001_.png [output]" in I.output_images()
    image, mask = I.load_image_output("result_00001_.png [output]")
    assert image.shape == (1, 8, 8, 3) and image[..., 0].eq(1).all()
    assert I.load_image_output("result_00001_.png")[0].equal(image)
    prompt = {"1": {"class_type": "LoadImageOutput", "inputs": {"image": "missing.png [output]"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    vr = validate_prompt(prompt, registry)
    assert not vr.ok and "missing.png" in str(vr.node_errors["1"])
    prompt["1"]["inputs"]["image"] = "../escape.png [output]"
    assert not validate_prompt(prompt, registry).ok


def test_blur_kernel_spans_minus_one_to_one_like_comfyui():
    dot = img(value=0.0, h=9, w=9)
    dot[0, 4, 4] = 1.0
    out = I.image_blur(dot, 1, 1.0)[0, :, :, 0]
    e = torch.exp(torch.tensor(-0.5)).item()
    total = 1 + 4 * e + 4 * e * e
    assert out[4, 4].item() == pytest.approx(1 / total, abs=1e-6)
    assert out[4, 5].item() == pytest.approx(e / total, abs=1e-6)
    assert out[3, 3].item() == pytest.approx(e * e / total, abs=1e-6)
