"""Mask nodes from ComfyUI core, called directly."""
from __future__ import annotations

import pytest
import torch

from nodes import mask as M


def test_image_mask_conversions():
    img = torch.zeros(2, 4, 5, 4)
    img[..., 1] = 0.25
    img[..., 3] = 0.75
    assert M.image_to_mask(img, "green").eq(0.25).all() and M.image_to_mask(img, "alpha").eq(0.75).all()
    with pytest.raises(ValueError, match="channel: the image has no alpha channel"):
        M.image_to_mask(img[..., :3], "alpha")
    back = M.mask_to_image(torch.full((2, 4, 5), 0.5))
    assert back.shape == (2, 4, 5, 3) and back.eq(0.5).all()
    with pytest.raises(ValueError, match="mask: not a MASK"):
        M.mask_to_image(torch.zeros(5))


def test_image_color_to_mask_matches_8bit_rgb():
    img = torch.zeros(1, 2, 2, 3)
    img[0, 0, 0] = torch.tensor([1.0, 128 / 255, 0.0])
    m = M.image_color_to_mask(img, 0xFF8000)
    assert m.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]


def test_solid_invert_crop_threshold():
    solid = M.solid_mask(0.25, 6, 4)
    assert solid.shape == (1, 4, 6) and solid.eq(0.25).all()
    assert M.invert_mask(solid).eq(0.75).all()
    grid = torch.arange(24.0).reshape(1, 4, 6)
    assert M.crop_mask(grid, 2, 1, 3, 10).tolist() == [[[8.0, 9.0, 10.0], [14.0, 15.0, 16.0], [20.0, 21.0, 22.0]]]
    with pytest.raises(ValueError, match=r"x/y: \(6, 0\) lies outside the 6x4 mask"):
        M.crop_mask(grid, 6, 0, 1, 1)
    assert M.threshold_mask(torch.tensor([[[0.2, 0.5, 0.8]]]), 0.5).tolist() == [[[0.0, 0.0, 1.0]]]


@pytest.mark.parametrize("op,expect", [
    ("multiply", 0.48), ("add", 1.0), ("subtract", 0.0), ("and", 1.0), ("or", 1.0), ("xor", 0.0)])
def test_mask_composite_operations_on_the_overlap(op, expect):
    dst = torch.full((1, 4, 4), 0.6)
    src = torch.full((1, 2, 2), 0.8)
    out = M.mask_composite(dst, src, 3, 3, op)  # add and subtract are clamped to 0..1
    assert out[0, 3, 3].item() == pytest.approx(expect)
    assert out[0, 0, 0].item() == pytest.approx(0.6)  # outside the overlap: unchanged
    assert out.shape == (1, 4, 4)


def test_mask_composite_logic_rounds_to_binary():
    dst, src = torch.tensor([[[0.6, 0.2]]]), torch.tensor([[[0.4, 0.9]]])
    assert M.mask_composite(dst, src, 0, 0, "xor").tolist() == [[[1.0, 1.0]]]
    assert M.mask_composite(dst, src, 0, 0, "and").tolist() == [[[0.0, 0.0]]]
    assert M.mask_composite(dst, src, 0, 0, "subtract")[0, 0, 0].item() == pytest.approx(0.2)


def test_mask_composite_batch_mismatch_is_named():
    with pytest.raises(ValueError, match="source: batch of 2 masks does not match destination's 3"):
        M.mask_composite(torch.zeros(3, 4, 4), torch.zeros(2, 4, 4), 0, 0, "add")


def test_feather_mask_linear_ramps():
    out = M.feather_mask(torch.ones(1, 4, 8), 4, 0, 2, 0)
    assert out[0, 0].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5])
    top = M.feather_mask(torch.ones(1, 4, 4), 0, 2, 0, 0)
    assert top[0, :, 0].tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])
    wide = M.feather_mask(torch.ones(1, 2, 4), 10, 0, 0, 0)
    assert wide[0, 0].tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_grow_mask_dilates_and_erodes():
    m = torch.zeros(1, 7, 7)
    m[0, 3, 3] = 1
    cross = M.grow_mask(m, 1, True)[0]
    assert cross.sum().item() == 5 and cross[2, 2].item() == 0  # tapered: a plus shape
    square = M.grow_mask(m, 1, False)[0]
    assert square.sum().item() == 9
    assert M.grow_mask(m, 2, True)[0].sum().item() == 13  # a diamond of radius 2
    assert M.grow_mask(square.unsqueeze(0), -1, False)[0].sum().item() == 1
    assert M.grow_mask(m, 0, True).equal(m)


def test_mask_preview_writes_a_temp_image(sd_env):
    from nodes.runtime import runtime
    out = M.mask_preview(torch.ones(1, 8, 8))
    images = out.ui["images"]
    assert images[0]["type"] == "temp" and (runtime().temp_dir / images[0]["filename"]).is_file()


def test_a_bad_input_fails_the_node_by_name_through_the_executor(sd_env):
    from engine.executor import Executor
    registry, config = sd_env
    prompt = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 16}},
        "2": {"class_type": "CropMask", "inputs": {"mask": ["1", 0], "x": 40, "y": 0, "width": 8, "height": 8}},
        "3": {"class_type": "MaskPreview", "inputs": {"mask": ["2", 0]}},
    }
    result = Executor(registry, config=config).execute(prompt, "crop")
    assert result.status == "error"
    assert result.error["exception_message"] == "CropMask (node 2): x/y: (40, 0) lies outside the 16x16 mask"
    prompt["2"]["inputs"]["x"] = 4
    result = Executor(registry, config=config).execute(prompt, "crop")
    assert result.status == "success", result.error
