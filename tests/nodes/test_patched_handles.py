"""Patched MODEL handles (LoRA, merges) on one shared base UNet, patched in place when they run: no UNet
copies, exact outputs whichever handle ran before, partial loading and moves, the cache's accounting."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from engine.cache import OutputCache
from nodes.loaders import checkpoint_loader_simple
from nodes.lora import lora_loader_model_only
from nodes.models import lora as lora_models
from nodes.models.diffusion_model import DiffusionModelHandle
from nodes.models.memory import module_footprint

from .conftest import TINY_SD1, activate

TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.resnets.0.conv1",
           "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]


@pytest.fixture()
def model(sd_env):
    """A private handle on a private copy of the tiny UNet (these tests patch its weights)."""
    activate(sd_env)
    base = checkpoint_loader_simple(TINY_SD1)[0]
    return DiffusionModelHandle(copy.deepcopy(base.base_unet), base.arch, base.prediction_type, device="cpu")


def _write_lora(sd_env, unet, seed: int) -> str:
    _, config = sd_env
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    sd = {}
    for name in TARGETS:
        w = modules[name].weight
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=gen) * 0.2
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []), generator=gen)
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    name = f"patched-{seed}.safetensors"
    save_file(sd, str(config.models_dir / "loras" / name))
    lora_models.clear_cache()
    return name


def _fresh(unet, lora_names_strengths):
    """An independent model: a new copy of the base weights with the LoRAs merged into copies."""
    unet = copy.deepcopy(unet)
    for name, strength in lora_names_strengths:
        lora = lora_models.load_lora_file(_path(name))
        new, _, unknown = lora_models.apply_lora(lora, unet, None, strength, 0.0)
        assert not unknown and new is not None
        unet = new
    return DiffusionModelHandle(unet, "sd1", device="cpu")


def _path(name):
    from nodes.runtime import runtime
    return runtime().folders.require("loras", name)


def _run(handle) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    dim = int(handle.base_unet.config.cross_attention_dim)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    return handle.apply(x, torch.tensor([500.0, 500.0]), {"context": torch.randn(2, 77, dim, generator=gen)})


def _storages(handle) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in handle.base_unet.parameters()}


def _target_bytes(unet) -> int:
    modules = dict(unet.named_modules())
    return sum(modules[n].weight.numel() * modules[n].weight.element_size() for n in TARGETS)


def test_strength_changes_and_a_second_lora_allocate_no_unet_copy(sd_env, model):
    a, b = _write_lora(sd_env, model.base_unet, 1), _write_lora(sd_env, model.base_unet, 2)
    storages, total = _storages(model), sum(module_footprint([model.base_unet]).values())
    handles = [lora_loader_model_only(model, a, 0.5), lora_loader_model_only(model, a, 1.0)]
    handles.append(lora_loader_model_only(handles[1], b, 0.7))
    patcher = model._weights.patcher("unet")
    for handle in handles:
        assert handle.unet is model.base_unet and len(handle._weights.modules) == 1
        assert _storages(handle) == storages
        assert sum(module_footprint([handle.unet]).values()) == total
        assert patcher.extra_bytes() == _target_bytes(model.base_unet)   # only the adapted tensors' originals
        assert sum(handle.footprint().values()) == total + patcher.extra_bytes()


def test_alternating_runs_equal_fresh_independent_loads(sd_env, model):
    a, b = _write_lora(sd_env, model.base_unet, 3), _write_lora(sd_env, model.base_unet, 4)
    reference_unet = copy.deepcopy(model.base_unet)
    want = {"base": _run(_fresh(reference_unet, [])), "a": _run(_fresh(reference_unet, [(a, 0.8)])),
            "a2": _run(_fresh(reference_unet, [(a, -0.3)])), "ab": _run(_fresh(reference_unet, [(a, 0.8), (b, 1.0)]))}
    ha = lora_loader_model_only(model, a, 0.8)
    handles = {"base": model, "a": ha, "a2": lora_loader_model_only(model, a, -0.3),
               "ab": lora_loader_model_only(ha, b, 1.0)}
    assert not torch.equal(want["base"], want["a"]) and not torch.equal(want["a"], want["ab"])
    for key in ("a", "base", "ab", "a2", "a", "ab", "base"):
        assert torch.equal(_run(handles[key]), want[key]), key
    # the base handle used last: its exact original bytes are back
    for (name, p), (_, q) in zip(model.base_unet.named_parameters(), reference_unet.named_parameters()):
        assert torch.equal(p, q), name


def test_partial_loading_under_a_small_budget_runs_patched(sd_env, model):
    a = _write_lora(sd_env, model.base_unet, 5)
    want_a = _run(_fresh(copy.deepcopy(model.base_unet), [(a, 1.0)]))
    want_base = _run(_fresh(copy.deepcopy(model.base_unet), []))
    patched = lora_loader_model_only(model, a, 1.0)
    holder = model._weights
    total = sum(module_footprint([model.base_unet]).values())
    holder.load("cpu", total // 3)                 # a simulated accelerator with a third of the room
    split = holder.partial
    assert split is not None and split.streamed
    assert torch.equal(_run(patched), want_a)
    assert split.visits > 0
    assert torch.equal(_run(model), want_base)
    assert torch.equal(_run(patched), want_a)
    holder.load("cpu", None)


def test_a_move_restores_the_originals_and_the_next_run_repatches(sd_env, model):
    """Decision: the originals do not follow their weights to another device; a move first restores
    them, and the handle that runs next patches again where the weights now are."""
    a = _write_lora(sd_env, model.base_unet, 6)
    original = {k: v.detach().clone() for k, v in model.base_unet.named_parameters()}
    patched = lora_loader_model_only(model, a, 1.0)
    want = _run(patched)
    patcher = model._weights.patcher("unet")
    assert patcher.extra_bytes() > 0
    model._weights.load("cpu", sum(module_footprint([model.base_unet]).values()) // 2)   # a move (a re-split)
    assert patcher.extra_bytes() == 0 and patcher.key == ()
    for k, v in model.base_unet.named_parameters():
        assert torch.equal(v, original[k]), k
    assert torch.equal(_run(patched), want) and patcher.extra_bytes() > 0
    model._weights.load("cpu", None)
    assert torch.equal(_run(patched), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_patched_runs_across_a_cuda_move(sd_env, model):
    a = _write_lora(sd_env, model.base_unet, 7)
    patched = lora_loader_model_only(model, a, 1.0)
    want = _run(patched)
    patched.load_device = "cuda"
    model._weights.load("cuda", None)
    patcher = model._weights.patcher("unet")
    assert patcher.extra_bytes() == 0
    got = _run(patched).cpu()
    assert all(t.device.type == "cuda" for t in patcher.originals())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model._weights.load("cpu", None)


def test_the_cache_counts_the_patch_delta_not_a_unet(sd_env, model):
    a = _write_lora(sd_env, model.base_unet, 8)
    cache = OutputCache({"cpu": 1 << 40})
    cache.put("ckpt", [[model]])
    base_bytes = cache.usage()["cpu"]
    for i, strength in enumerate((0.5, 1.0, -1.0)):
        handle = lora_loader_model_only(model, a, strength)
        _run(handle)
        cache.put(f"lora-{i}", [[handle]])
        # three strengths in the cache: the base plus one set of kept originals
        assert cache.usage()["cpu"] == base_bytes + _target_bytes(model.base_unet)
