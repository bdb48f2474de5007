"""cond and uncond share one UNet call while memory allows; a call that runs out of memory is split."""
from __future__ import annotations

import torch

from nodes.conditioning import clip_text_encode
from nodes.models.checkpoint import load_checkpoint
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.text_encoder import ClipHandle
from nodes.models.tiny import write_tiny_checkpoint
from nodes.sampling.guidance import CFGDenoiser
from nodes.sampling.model_sampling import DiscreteSchedule


def test_a_model_call_that_runs_out_of_memory_is_split_and_gives_the_same_result(tmp_path):
    ckpt = load_checkpoint(write_tiny_checkpoint(tmp_path / "t.safetensors", "sd1", seed=2))
    model, clip = DiffusionModelHandle.from_checkpoint(ckpt), ClipHandle.from_checkpoint(ckpt)
    pos, neg = clip_text_encode("a cat", clip), clip_text_encode("blurry", clip)
    schedule = DiscreteSchedule(prediction_type=model.prediction_type)
    shape = (2, 4, 8, 8)
    x, sigma = torch.randn(shape, generator=torch.Generator().manual_seed(0)), schedule.sigmas[5].repeat(2)
    batches: list[int] = []

    def small_accelerator(x_in, timestep, cond):
        """The real UNet on a device that holds one latent batch at a time (batch 4 = cond + uncond
        of two latents does not fit): the allocator's error, as torch raises it."""
        batches.append(x_in.shape[0])
        if x_in.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model.apply(x_in, timestep, cond)

    together = CFGDenoiser(model.apply, schedule, pos, neg, 6.0, latent_shape=shape)
    expected = together(x.clone(), sigma)
    assert together.model_calls == 1                      # one call for cond and uncond

    split = CFGDenoiser(small_accelerator, schedule, pos, neg, 6.0, latent_shape=shape)
    got = split(x.clone(), sigma)
    assert batches == [4, 2, 2] and split.max_batch == 1     # one entry (cond or uncond) per call
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    batches.clear()
    split(x.clone(), sigma)                               # the next step starts from the size that fit
    assert batches == [2, 2]


def test_other_errors_are_not_retried(tmp_path):
    ckpt = load_checkpoint(write_tiny_checkpoint(tmp_path / "t.safetensors", "sd1", seed=2))
    model, clip = DiffusionModelHandle.from_checkpoint(ckpt), ClipHandle.from_checkpoint(ckpt)
    pos, neg = clip_text_encode("a cat", clip), clip_text_encode("", clip)
    schedule = DiscreteSchedule(prediction_type=model.prediction_type)
    calls: list[int] = []

    def broken(x_in, timestep, cond):
        calls.append(x_in.shape[0])
        raise ValueError("shape mismatch")

    den = CFGDenoiser(broken, schedule, pos, neg, 6.0, latent_shape=(1, 4, 8, 8))
    try:
        den(torch.randn(1, 4, 8, 8), schedule.sigmas[5:6].clone())
    except ValueError:
        pass
    assert calls == [2]
