"""VAE decode/encode and model upscaling stop at the next batch chunk or tile after an interrupt."""
from __future__ import annotations

import torch

from engine import progress
from engine.events import Event
from engine.executor import Executor
from engine.progress import Interrupted, NodeContext
from nodes.models.upscale import tiled_upscale
from nodes.models.vae import CHUNK_PIXELS

from .conftest import TINY_SD1


def test_vae_decode_of_a_big_batch_stops_within_one_chunk(sd_env):
    registry, config = sd_env
    size, batch = 256, 64
    chunks = batch // (CHUNK_PIXELS // (size * size))
    assert chunks >= 4
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    ex = Executor(registry, config=config)
    seen: list[tuple] = []

    def emit(event: Event) -> None:
        if event.type == "progress" and event.data["node"] == "8":
            seen.append((event.data["value"], event.data["max"]))
            ex.interrupt()                      # as /interrupt would, from the first chunk's report

    result = ex.execute(prompt, "decode", emit=emit)
    assert result.status == "interrupted"
    assert seen == [(1, chunks)]                 # one chunk ran, the rest did not
    assert "8" not in result.executed and "9" not in result.outputs
    # without an interrupt the same decode completes, in chunks, with the same images as one batch
    ok = ex.execute(prompt, "decode-2")
    assert ok.status == "success"


def test_vae_encode_is_chunked_and_interruptible(sd_env):
    from nodes.models.tiny import tiny_checkpoint_models
    from nodes.models.vae import VaeHandle

    vae = VaeHandle(tiny_checkpoint_models("sd1", seed=4).vae, device="cpu")
    pixels = torch.rand(8, 512, 512, 3)
    reports: list[tuple] = []
    calls = [0]

    def check() -> None:
        calls[0] += 1
        if calls[0] > 2:     # the chunk loop and the progress report each check once
            raise Interrupted("interrupted")

    token = progress._current.set(NodeContext("1", "p", check, lambda v, t, p: reports.append((v, t))))
    try:
        try:
            vae.encode(pixels)
            raise AssertionError("not interrupted")
        except Interrupted:
            pass
    finally:
        progress._current.reset(token)
    assert reports == [(1, 2)]


class CountingX2(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_model_upscale_stops_at_the_next_tile():
    model = CountingX2()
    checks = [0]

    def check() -> None:
        checks[0] += 1
        if checks[0] >= 3:
            raise Interrupted("interrupted")

    token = progress._current.set(NodeContext("1", "p", check, lambda v, t, p: None))
    try:
        try:
            tiled_upscale(torch.rand(2, 3, 512, 512), model, 2, tile=128, overlap=16, min_tile=64)
            raise AssertionError("not interrupted")
        except Interrupted:
            pass
    finally:
        progress._current.reset(token)
    assert model.calls == 3                      # of 2 x 25 tiles
