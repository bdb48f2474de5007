"""Partial loading (models larger than the accelerator budget) and the VRAM-mode switches.

The CPU tests split a tiny real UNet onto the CPU as a simulated accelerator: resident blocks stay put,
streamed blocks are copied in for each forward and dropped after, as they would be on a GPU."""
from __future__ import annotations

import pytest
import torch

from engine.cache import OutputCache
from engine.config import RuntimeConfig, reset_current_config, set_current_config
from engine.memory import room
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.memory import default_device, module_footprint, resident_limit, vram_mode
from nodes.models.tiny import tiny_checkpoint_models


def _inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    context = torch.randn(batch, 77, 32, generator=gen)
    return x, torch.tensor([500.0] * batch), {"context": context}


def _handle(device: str = "cpu") -> DiffusionModelHandle:
    unet = tiny_checkpoint_models("sd1", seed=3).unet
    return DiffusionModelHandle(unet, "sd1", device=device)


def _context_dim(handle: DiffusionModelHandle) -> int:
    return int(handle.unet.config.cross_attention_dim)


def test_a_unet_split_under_a_budget_computes_exactly_what_the_resident_one_does():
    handle = _handle()
    x, t, cond = _inputs()
    cond["context"] = cond["context"][..., :_context_dim(handle)]
    full = handle.apply(x, t, cond)
    total = sum(module_footprint([handle.unet]).values())
    limit = total // 3                                   # the simulated accelerator holds a third
    holder = handle._weights
    holder.load("cpu", limit)
    split = holder.partial
    assert split is not None and split.resident and split.streamed
    assert split.resident_bytes <= limit < split.resident_bytes + split.streamed_bytes == total

    streamed = split.streamed[-1]
    weight = next(p for p in streamed._parameters.values() if p is not None)
    home_ptr = weight.data_ptr()
    seen: list[int] = []
    probe = streamed.register_forward_pre_hook(lambda m, a: seen.append(weight.data_ptr()))
    try:
        out = handle.apply(x, t, cond)
    finally:
        probe.remove()
    assert torch.equal(out, full)
    assert seen and all(ptr != home_ptr for ptr in seen)     # it computed on a visiting copy...
    assert weight.data_ptr() == home_ptr                     # ...and its weights went home after
    assert split.visits >= len(split.streamed)

    holder.load("cpu", None)                             # whole again: hooks gone, same results
    assert holder.partial is None
    assert not any(m._forward_pre_hooks for m in handle.unet.modules())
    assert torch.equal(handle.apply(x, t, cond), full)


def test_a_budget_of_nothing_streams_every_block_and_still_matches():
    handle = _handle()
    x, t, cond = _inputs(batch=1, seed=2)
    cond["context"] = cond["context"][..., :_context_dim(handle)]
    full = handle.apply(x, t, cond)
    handle._weights.load("cpu", 0)
    split = handle._weights.partial
    assert split is not None and not split.resident and split.resident_bytes == 0
    assert handle.compute_device == torch.device("cpu")
    assert torch.equal(handle.apply(x, t, cond), full)


def test_resident_limit_follows_the_comfyui_modes():
    mib = 1 << 20
    assert resident_limit("normal", 100 * mib, 500 * mib) is None          # fits: whole
    assert resident_limit("normal", 100 * mib, 40 * mib) == 40 * mib       # does not: split
    assert resident_limit("lowvram", 100 * mib, 40 * mib) == 40 * mib
    assert resident_limit("normal", 100 * mib, None) is None               # no budget known: whole
    assert resident_limit("highvram", 100 * mib, 40 * mib) is None         # never split
    assert resident_limit("gpu-only", 100 * mib, 40 * mib) is None
    assert resident_limit("novram", 100 * mib, 500 * mib) == 0             # nothing resident


def test_the_room_a_split_uses_comes_from_the_cache_budget():
    cache = OutputCache({"sim": 10_000, "cpu": 1 << 30})
    cache.put("t", [[torch.zeros(256)]])                   # 1 KiB on the CPU: no "sim" memory used
    assert room("sim:0") is not None and room("sim:0") <= 10_000
    assert cache.room("sim") == 10_000 and cache.room("nothing") is None


def test_cli_switches_set_the_vram_mode():
    from server.cli import build_parser, make_config
    parser = build_parser()
    for flag, mode in (("--gpu-only", "gpu-only"), ("--highvram", "highvram"), ("--normalvram", "normal"),
                       ("--lowvram", "lowvram"), ("--novram", "novram"), ("--cpu", "cpu")):
        args = parser.parse_args(["validate", "w.json", flag])
        assert args.vram_mode == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["validate", "w.json", "--lowvram", "--highvram"])
    with pytest.raises(ValueError, match="vram_mode"):
        RuntimeConfig(vram_mode="tiny")
    assert make_config is not None


def test_cpu_mode_computes_on_the_cpu(tmp_path):
    token = set_current_config(RuntimeConfig(data_dir=tmp_path, vram_mode="cpu"))
    try:
        assert vram_mode() == "cpu" and default_device() == "cpu"
    finally:
        reset_current_config(token)
    assert vram_mode() == "normal"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_split_unet_on_cuda_keeps_only_its_resident_part_there():
    handle = _handle("cuda")
    x, t, cond = _inputs()
    cond["context"] = cond["context"][..., :_context_dim(handle)]
    handle._weights.load("cuda", None)
    full = handle.apply(x, t, cond)
    handle._weights.load("cpu", None)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    total = sum(module_footprint([handle.unet]).values())
    handle._weights.load("cuda", total // 2)
    torch.cuda.synchronize()
    split = handle._weights.partial
    assert split is not None and split.streamed
    assert torch.cuda.memory_allocated() - before <= split.resident_bytes + (1 << 20)
    assert handle.footprint().get("cuda:0", 0) == split.resident_bytes
    out = handle.apply(x, t, cond)
    assert torch.allclose(out, full, atol=1e-3, rtol=1e-3)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= split.resident_bytes + (1 << 20)
