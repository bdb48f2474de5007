"""Model upscaling: tiling and blending with a real tiny x2 network, the OOM fallback, and the clear error
when the optional spandrel/torchvision stack is unavailable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nodes.models.upscale import UpscaleDependencyError, UpscaleModelHandle, tiled_upscale, upscale_tiles
from nodes.upscale import image_upscale_with_model, upscale_model_loader

ROOT = Path(__file__).resolve().parents[2]


class TinyX2(nn.Module):
    """conv 3x3 -> 12 channels -> PixelShuffle(2): a real x2 upscaler with a 1-pixel receptive border."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.2)
            self.conv.bias.fill_(bias)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class OomAbove(nn.Module):
    """Wraps a model and fails like an allocator would for tiles larger than `limit` pixels per side."""

    def __init__(self, inner: nn.Module, limit: int | None) -> None:
        super().__init__()
        self.inner, self.limit, self.seen = inner, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        if self.limit is None or max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def _image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _full(net: nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(image.movedim(-1, 1)).movedim(1, -1)


def test_small_image_is_one_tile_and_exact():
    net = TinyX2()
    img = _image(2, 40, 56)
    out = image_upscale_with_model(UpscaleModelHandle(net, 2, device="cpu"), img)
    assert out.shape == (2, 80, 112, 3)
    assert torch.equal(out, _full(net, img).clamp(0, 1))


@pytest.mark.parametrize("size", [(150, 170), (97, 64), (64, 200)])
def test_tiles_blend_without_seams(size):
    net = TinyX2()
    img = _image(1, *size, seed=1).movedim(-1, 1)
    tiled = upscale_tiles(img, net, 2, tile=48, overlap=16)
    with torch.no_grad():
        full = net(img)
    assert tiled.shape == full.shape == (1, 3, size[0] * 2, size[1] * 2)
    # every output pixel that saw zero padding inside a tile has zero weight there
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)


def test_without_the_fade_tiles_would_show_seams():
    net = TinyX2()
    img = _image(1, 100, 100, seed=2).movedim(-1, 1)
    naive = upscale_tiles(img, net, 2, tile=48, overlap=0)    # plain abutting tiles
    with torch.no_grad():
        full = net(img)
    assert (naive - full).abs().max() > 1e-3                  # so the blending test above can fail


def test_node_uses_512_tiles_and_clamps():
    net = TinyX2(bias=0.6)                                     # pushes many values above 1
    img = _image(1, 24, 600, seed=3)
    raw = _full(net, img)
    assert raw.max() > 1.0 and raw.min() < 0.0
    guard = OomAbove(net, limit=512)                           # a 600-wide single tile would fail
    out = image_upscale_with_model(UpscaleModelHandle(guard, 2, device="cpu"), img)
    assert {s[1] for s in guard.seen} == {512}                 # two 512-wide tiles, no fallback
    assert out.min() >= 0.0 and out.max() <= 1.0
    torch.testing.assert_close(out, raw.clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_out_of_memory_halves_the_tile_down_to_128():
    net = TinyX2()
    img = _image(1, 300, 300, seed=4)
    guard = OomAbove(net, limit=128)
    out = image_upscale_with_model(UpscaleModelHandle(guard, 2, device="cpu"), img)
    sizes = [max(s) for s in guard.seen]
    assert sizes[0] == 300 and 256 in sizes and max(sizes[sizes.index(256) + 1:]) == 128
    torch.testing.assert_close(out, _full(net, img).clamp(0, 1), atol=1e-5, rtol=1e-5)

    always = OomAbove(net, limit=None)
    with pytest.raises(torch.OutOfMemoryError):
        image_upscale_with_model(UpscaleModelHandle(always, 2, device="cpu"), img)
    assert sorted({max(s) for s in always.seen}, reverse=True) == [300, 256, 128]


def test_other_errors_are_not_retried():
    calls = []

    def broken(x):
        calls.append(x.shape)
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        tiled_upscale(torch.rand(1, 3, 32, 32), broken, 2)
    assert len(calls) == 1


def test_wrong_scale_is_reported():
    with pytest.raises(ValueError, match="expected x4"):
        upscale_tiles(torch.rand(1, 3, 16, 16), TinyX2(), 4)


def _write_upscaler_file(config) -> str:
    from safetensors.torch import save_file
    path = config.models_dir / "upscale_models" / "tiny-x2.safetensors"
    save_file({k: v.contiguous() for k, v in TinyX2().state_dict().items()}, str(path))
    return path.name


def test_loader_without_spandrel_gives_a_clear_error(sd_env, monkeypatch):
    _, config = sd_env
    name = _write_upscaler_file(config)
    monkeypatch.setitem(sys.modules, "spandrel", None)         # what an absent package looks like to import
    with pytest.raises(UpscaleDependencyError) as info:
        upscale_model_loader(name)
    msg = str(info.value)
    assert msg.startswith("UpscaleModelLoader: upscale models need the optional 'spandrel' package "
                          "(pip install 'sdflow[upscale]'), which needs a working torchvision")
    assert "ImportError" in msg or "ModuleNotFoundError" in msg


def test_loader_on_this_install(sd_env):
    """Without monkeypatching: here spandrel/torchvision are unusable, so the same clear error comes."""
    import importlib.util
    _, config = sd_env
    name = _write_upscaler_file(config)
    try:
        usable = all(importlib.util.find_spec(m) is not None for m in ("spandrel", "torchvision"))
    except (ImportError, ValueError):
        usable = False
    if usable:
        pytest.skip("spandrel is installed here")
    with pytest.raises(UpscaleDependencyError, match="pip install 'sdflow\\[upscale\\]'"):
        upscale_model_loader(name)


def test_start_up_imports_neither_torchvision_nor_spandrel(sd_env):
    code = (
        "import sys, tempfile\n"
        "import nodes.builtin\n"
        "from engine.config import RuntimeConfig\n"
        "reg, _ = nodes.builtin.build_registry(RuntimeConfig(data_dir=tempfile.mkdtemp()), plugins=False)\n"
        "names = {n.name for n in reg}\n"
        "assert {'UpscaleModelLoader', 'ImageUpscaleWithModel', 'LoraLoader', 'ControlNetLoader'} <= names, names\n"
        "bad = [m for m in ('torchvision', 'spandrel') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_registered_schemas(sd_env):
    registry, _ = sd_env
    loader = registry.get("UpscaleModelLoader").info()
    assert loader["category"] == "loaders" and loader["output"] == ["UPSCALE_MODEL"]
    up = registry.get("ImageUpscaleWithModel").info()
    assert up["input_order"]["required"] == ["upscale_model", "image"] and up["output"] == ["IMAGE"]
    assert up["category"] == "image/upscaling"
