"""VAEDecodeTiled / VAEEncodeTiled: ComfyUI's inputs; one tile equals the plain path; with several tiles
every region covered by one tile only is exactly that tile's own decode/encode."""
from __future__ import annotations

import torch

from engine.executor import Executor
from nodes.latent import vae_decode, vae_decode_tiled, vae_encode, vae_encode_tiled
from nodes.loaders import checkpoint_loader_simple

from .conftest import TINY_SD1


def _image(size=128):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([xx, yy, (xx * yy).sqrt()], dim=-1)[None]


def test_one_tile_is_the_plain_path(sd_env):
    vae = checkpoint_loader_simple(TINY_SD1)[2]
    image = _image(128)
    latent = vae_encode(image, vae)
    tiled = vae_encode_tiled(image, vae, 512, 64, 64, 8)["samples"]
    torch.testing.assert_close(tiled, latent["samples"])
    torch.testing.assert_close(vae_decode_tiled(latent, vae, 512, 64, 64, 8), vae_decode(latent, vae))


def test_several_tiles_cover_the_image(sd_env):
    vae = checkpoint_loader_simple(TINY_SD1)[2]
    image = _image(192)
    latent = vae_encode(image, vae)
    plain = vae_decode(latent, vae)
    tiled = vae_decode_tiled(latent, vae, 64, 32, 64, 8)   # 8x8 latent tiles, 4 overlapping
    assert tiled.shape == plain.shape == (1, 192, 192, 3)
    assert not torch.equal(tiled, plain)   # the tiles really are decoded apart
    # the corner before the second tile starts (latent 4 = 32 px) comes from the first tile alone
    corner = vae_decode({"samples": latent["samples"][..., :8, :8]}, vae)
    torch.testing.assert_close(tiled[:, :32, :32], corner[:, :32, :32])
    enc = vae_encode_tiled(image, vae, 64, 32, 64, 8)["samples"]
    assert enc.shape == latent["samples"].shape
    first = vae_encode(image[:, :64, :64], vae)["samples"]
    torch.testing.assert_close(enc[..., :4, :4], first[..., :4, :4])
    # an overlap above a quarter of the tile is cut to a quarter (ComfyUI's rule), not refused
    assert vae_decode_tiled(latent, vae, 64, 4096, 64, 8).shape == plain.shape


def test_tiled_nodes_in_a_graph_with_comfyui_inputs(sd_env):
    registry, _ = sd_env
    info = registry.object_info()
    assert list(info["VAEDecodeTiled"]["input"]["required"]) == ["samples", "vae", "tile_size", "overlap",
                                                                  "temporal_size", "temporal_overlap"]
    assert info["VAEEncodeTiled"]["input"]["required"]["tile_size"][1]["step"] == 64
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "3": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["2", 0], "vae": ["1", 2], "tile_size": 64,
                                                               "overlap": 32, "temporal_size": 64,
                                                               "temporal_overlap": 8}},
              "4": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["1", 2], "tile_size": 64,
                                                               "overlap": 32, "temporal_size": 64,
                                                               "temporal_overlap": 8}},
              "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    result = Executor(registry).execute(prompt, "tiled")
    assert result.status == "success", result.error
    assert result.outputs["5"]["images"]
