"""In-place weight patching (nodes/models/weight_patch.py) on the tiny SD1 UNet with real LoRA files."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from nodes.loaders import checkpoint_loader_simple
from nodes.models import lora as lora_models
from nodes.models.weight_patch import InPlacePatcher, chain

from .conftest import TINY_SD1, activate

TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.resnets.0.conv1",
           "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]


@pytest.fixture()
def unet(sd_env):
    """A private copy of the tiny UNet: these tests write into its weights."""
    activate(sd_env)
    return copy.deepcopy(checkpoint_loader_simple(TINY_SD1)[0].base_unet)


def _lora(tmp_path, unet, seed: int, fmt: str = "lora"):
    """A real LoRA file for TARGETS (kohya LoRA or LoHa), read back and resolved against `unet`."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    sd = {}
    for name in TARGETS:
        w = modules[name].weight
        key = "lora_unet_" + name.replace(".", "_")
        flat_in = w[0].numel()
        if fmt == "lora":
            sd[f"{key}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=gen) * 0.1
            sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []), generator=gen)
        else:
            for i in (1, 2):
                sd[f"{key}.hada_w{i}_a"] = torch.randn(w.shape[0], 2, generator=gen) * 0.3
                sd[f"{key}.hada_w{i}_b"] = torch.randn(2, flat_in, generator=gen) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path / f"{fmt}-{seed}.safetensors"
    save_file(sd, str(path))
    lora_models.clear_cache()
    patches, unknown = lora_models.resolve(lora_models.load_lora_file(path), unet, None)
    assert not unknown and len(patches) == len(TARGETS)
    return patches


def _state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.named_parameters()}


def _expected(original, patches, strength):
    return lora_models.lora_patch_fn(patches, strength)(original)


def test_patch_and_restore_round_trip_exact_bytes_in_the_same_tensors(tmp_path, unet):
    before = _state(unet)
    ptrs = {k: v.data_ptr() for k, v in unet.named_parameters()}
    patches = _lora(tmp_path, unet, 1, "loha")
    patcher = InPlacePatcher(unet)
    patcher.sync(("a", 0.8), lora_models.lora_patch_fn(patches, 0.8))

    want = _expected(before, patches, 0.8)
    assert set(want) == {f"{t}.weight" for t in TARGETS}
    for name, p in unet.named_parameters():
        assert p.data_ptr() == ptrs[name]                     # written in place, no new tensors
        if name in want:
            torch.testing.assert_close(p.detach(), want[name])
            assert not torch.equal(p.detach(), before[name])
        else:
            assert torch.equal(p.detach(), before[name])
    assert set(patcher.patched) == set(want)                  # originals kept of the patched tensors only

    patcher.restore()
    for name, p in unet.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert patcher.extra_bytes() == 0 and patcher.key == ()


def test_two_lora_handles_over_one_base_alternate(tmp_path, unet):
    before = _state(unet)
    a, b = _lora(tmp_path, unet, 2), _lora(tmp_path, unet, 3, "loha")
    patcher = InPlacePatcher(unet)
    want_a, want_b = _expected(before, a, 1.0), _expected(before, b, 0.5)
    for key, fn, want in [(("a", 1.0), lora_models.lora_patch_fn(a, 1.0), want_a),
                          (("b", 0.5), lora_models.lora_patch_fn(b, 0.5), want_b),
                          (("a", 1.0), lora_models.lora_patch_fn(a, 1.0), want_a),
                          ((), None, {})]:
        patcher.sync(key, fn)
        params = dict(unet.named_parameters())
        for name, original in before.items():
            torch.testing.assert_close(params[name].detach(), want.get(name, original), atol=0, rtol=0)
    for name, p in unet.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_stacked_loras_equal_the_sum_of_their_deltas(tmp_path, unet):
    before = _state(unet)
    a, b = _lora(tmp_path, unet, 4), _lora(tmp_path, unet, 5)
    patcher = InPlacePatcher(unet)
    patcher.sync(("a+b",), chain(lora_models.lora_patch_fn(a, 0.7), lora_models.lora_patch_fn(b, -0.3)))
    da, db = _expected(before, a, 0.7), _expected(before, b, -0.3)
    params = dict(unet.named_parameters())
    for name in da:
        torch.testing.assert_close(params[name].detach(), da[name] + db[name] - before[name], atol=1e-6, rtol=1e-5)
    patcher.restore()
    assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())


def _storages(module) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in list(module.parameters()) + list(module.buffers())}


def test_a_strength_change_costs_the_patched_tensors_not_a_unet(tmp_path, unet):
    patches = _lora(tmp_path, unet, 6)
    patcher = InPlacePatcher(unet)
    storages = _storages(unet)
    unet_bytes = sum(storages.values())
    patched_bytes = sum(p.numel() * p.element_size() for n, p in unet.named_parameters()
                        if n in {f"{t}.weight" for t in TARGETS})
    for strength in (1.0, 0.5, -0.25):
        patcher.sync(("l", strength), lora_models.lora_patch_fn(patches, strength))
        assert _storages(unet) == storages                      # the module holds the same storages
        assert patcher.extra_bytes() == patched_bytes           # one set of originals, not one per strength
    assert patched_bytes * 10 < unet_bytes


def test_a_patch_of_the_wrong_shape_is_refused_and_leaves_the_weights(unet):
    before = _state(unet)
    patcher = InPlacePatcher(unet)
    name = f"{TARGETS[0]}.weight"
    with pytest.raises(ValueError, match="shape"):
        patcher.sync("bad", lambda w: {name: torch.zeros(3)})
    assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())
    assert patcher.key == ()
