"""HypernetworkLoader: A1111 .pt hypernetworks (weights-only unpickling), rebuilt MLPs and their effect
on the attention key/value inputs of the tiny SD1 UNet."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from engine.executor import Executor
from nodes.loaders import checkpoint_loader_simple
from nodes.lora import hypernetwork_loader
from nodes.models.hypernetwork import load_hypernetwork
from nodes.models.tiny import write_tiny_hypernetwork

from .conftest import TINY_SD1, activate


@pytest.fixture(scope="module")
def hn_files(sd_env):
    activate(sd_env)
    _, config = sd_env
    root = config.models_dir / "hypernetworks"
    root.mkdir(parents=True, exist_ok=True)
    obj = write_tiny_hypernetwork(root / "tiny-hn.pt")
    return root, obj


def test_mlps_are_rebuilt_as_a1111_computes_them(hn_files):
    root, obj = hn_files
    layers = load_hypernetwork(root / "tiny-hn.pt")
    assert set(layers) == {32, 64}
    sd = obj[64][1]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    h = F.relu(F.linear(x, sd["linear.0.weight"], sd["linear.0.bias"]))   # activation after the hidden layer
    h = F.layer_norm(h, (128,), sd["linear.2.weight"], sd["linear.2.bias"])
    h = F.linear(h, sd["linear.4.weight"], sd["linear.4.bias"])            # no activation after the output layer
    want = F.layer_norm(h, (64,), sd["linear.5.weight"], sd["linear.5.bias"])
    torch.testing.assert_close(layers[64][1](x), want)


def test_key_and_value_inputs_are_rewritten(hn_files):
    root, _ = hn_files
    model = checkpoint_loader_simple(TINY_SD1)[0]
    patched = hypernetwork_loader(model, "tiny-hn.pt", 0.7)
    patch = patched.sampling_patches["hypernetworks"][0]
    attn = next(m for m in model.unet.modules() if hasattr(m, "to_k") and m.to_k.in_features == 64)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    handles = patch.hooks(model.unet)
    try:
        k, v, q = attn.to_k(x), attn.to_v(x), attn.to_q(x)
    finally:
        for h in handles:
            h.remove()
    mk, mv = patch.layers[64]
    torch.testing.assert_close(k, attn.to_k(x + 0.7 * mk(x)))
    torch.testing.assert_close(v, attn.to_v(x + 0.7 * mv(x)))
    torch.testing.assert_close(q, attn.to_q(x))   # queries are untouched
    # during a model call only: afterwards the shared UNet is as before
    xin = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    base = model.apply(xin, 400, {"context": ctx})
    hn = patched.apply(xin, 400, {"context": ctx})
    assert not torch.allclose(base, hn)
    torch.testing.assert_close(model.apply(xin, 400, {"context": ctx}), base)
    assert hypernetwork_loader(model, "tiny-hn.pt", 0.0) is model


def test_hypernetwork_workflow_and_bad_files(sd_env, hn_files):
    registry, _ = sd_env
    root, _ = hn_files
    torch.save({"weights": types.SimpleNamespace(a=1)}, root / "unsafe.pt")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, root / "a-lora.pt")

    def prompt(name):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD1}},
                "2": {"class_type": "HypernetworkLoader", "inputs": {"model": ["1", 0], "hypernetwork_name": name,
                                                                     "strength": 1.0}},
                "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle", "clip": ["1", 1]}},
                "4": {"class_type": "KSampler", "inputs": {
                    "seed": 3, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
                    "denoise": 1.0, "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                    "latent_image": ["5", 0]}},
                "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
                "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}

    assert Executor(registry).execute(prompt("tiny-hn.pt"), "hn-ok").status == "success"
    for name, why in (("unsafe.pt", "unsafe unpickling"), ("a-lora.pt", "not an A1111 hypernetwork")):
        result = Executor(registry).execute(prompt(name), f"hn-{name}")
        assert result.status == "error" and result.error["node_id"] == "2", result.error
        msg = result.error["exception_message"]
        assert "HypernetworkLoader" in msg and "hypernetwork_name" in msg and name in msg and why in msg, msg
