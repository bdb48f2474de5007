"""The pixel budget on LoadImage and LoadImageMask: refused from the header at validation and at load."""
from __future__ import annotations

import pytest
from PIL import Image

from engine.image_limits import ImageTooLarge
from engine.validation import validate_prompt
from nodes import image as image_nodes
from tests.image_bombs import bomb_png


@pytest.fixture
def bomb(sd_env):
    _, config = sd_env
    path = config.input_dir / "bomb.png"
    path.write_bytes(bomb_png(11000, 11000))
    yield path
    path.unlink()


def test_image_bomb_is_refused_at_validation_naming_node_and_input(sd_env, bomb):
    registry, _ = sd_env
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "bomb.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    vr = validate_prompt(prompt, registry)
    assert not vr.ok
    err = vr.node_errors["1"]["errors"][0]
    assert err["type"] == "custom_validation_failed" and err["extra_info"]["input_name"] == "image"
    assert "11000x11000" in err["details"] and "budget" in err["details"]
    verdict = image_nodes.load_image_mask.__sdflow_node__.validate(image="bomb.png")
    assert isinstance(verdict, str) and "11000x11000" in verdict
    assert image_nodes.load_image_mask.__sdflow_node__.validate(image="example.png") is True


def test_image_bomb_is_refused_when_loaded_directly(sd_env, bomb):
    with pytest.raises(ImageTooLarge, match="11000x11000"):
        image_nodes.load_image("bomb.png")
    with pytest.raises(ImageTooLarge, match="11000x11000"):
        image_nodes.load_image_mask("bomb.png", "alpha")


def test_many_frames_count_against_the_budget(sd_env):
    _, config = sd_env
    frames = [Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(8)]
    path = config.input_dir / "frames.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    old = config.max_image_pixels
    try:
        config.max_image_pixels = 64 * 64 * 3
        with pytest.raises(ImageTooLarge, match="frames"):
            image_nodes.load_image("frames.gif")
        config.max_image_pixels = 64 * 64 * 8
        images, _ = image_nodes.load_image("frames.gif")
        assert images.shape[0] == 8
        config.max_image_pixels = None            # no limit
        assert image_nodes.load_image("frames.gif")[0].shape[0] == 8
    finally:
        config.max_image_pixels = old
        path.unlink()
