"""LyCORIS / DoRA / PEFT LoRA formats through the real loader nodes on the tiny SD1 checkpoint.

Each format's expected weight delta comes from an independent source: peft's own LoHa / LoKr / LoRA
layers (`get_delta_weight`) for the layouts peft implements, the functional composition of the three
convolutions for LoCon's Tucker `lora_mid`, and the DoRA formula for `dora_scale`.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from engine.executor import Executor
from engine.ui_workflow import ui_to_api
from nodes.loaders import checkpoint_loader_simple
from nodes.lora import lora_loader, lora_loader_model_only
from nodes.models import lora as lora_models
from nodes.models.state_dict import ModelFileError

from .conftest import TINY_SD1, activate, shrink

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE = "encoder.layers.0.self_attn.q_proj"
KOHYA = {ATTN: "lora_unet_" + ATTN.replace(".", "_"), CONV: "lora_unet_" + CONV.replace(".", "_"),
         TE: "lora_te_text_model_" + TE.replace(".", "_")}
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture(scope="module")
def base(sd_env):
    activate(sd_env)
    return checkpoint_loader_simple(TINY_SD1)[:2]


def _module(model, clip, name):
    root = clip.text_encoders["l"] if name == TE else model.unet
    return dict(root.named_modules())[name]


def _peft_layer(module: nn.Module, config, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Wrap a copy of `module` in peft's adapter layer, give the adapter random weights, and return
    ({part name: tensor} as peft stores them, peft's delta weight)."""
    holder = nn.Module()
    holder.target = copy.deepcopy(module)
    layer = peft.get_peft_model(holder, config).base_model.model.target
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    for name, param in layer.named_parameters():
        if param.requires_grad:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
            parts[name.split(".")[0]] = param.data.clone()
    with torch.no_grad():
        return parts, layer.get_delta_weight("default").detach().clone()


def _write(sd_env, name: str, sd: dict[str, torch.Tensor]) -> str:
    _, config = sd_env
    save_file({k: v.contiguous() for k, v in sd.items()}, str(config.models_dir / "loras" / name))
    lora_models.clear_cache()
    return name


def _changes(model, clip, new_model, new_clip, modules) -> dict[str, torch.Tensor]:
    # The patched UNet weight is cloned before the base handle's weight is read: that read restores the
    # shared module in place.
    out = {}
    for m in modules:
        patched = _module(new_model, new_clip, m).weight.detach().clone()
        out[m] = patched - _module(model, clip, m).weight.detach()
    return out


PEFT_CASES = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3.0, target_modules=["target"]),
    "loha-tucker": lambda: peft.LoHaConfig(r=2, alpha=3.0, target_modules=["target"], use_effective_conv2d=True),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3.0, target_modules=["target"]),
    "lokr-both-tucker": lambda: peft.LoKrConfig(r=1, alpha=3.0, target_modules=["target"], decompose_both=True,
                                                use_effective_conv2d=True),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_lycoris_deltas_match_peft_layers(sd_env, base, case):
    model, clip = base
    sd, expected = {}, {}
    for i, mod in enumerate((ATTN, CONV, TE)):
        parts, delta = _peft_layer(_module(model, clip, mod), PEFT_CASES[case](), seed=10 + i)
        if case == "lokr":
            assert "lokr_w1" in parts and "lokr_w2_a" in parts   # the w1-whole, w2-low-rank layout
        if case == "loha-tucker" and mod == CONV:
            assert "hada_t1" in parts
        if case == "lokr-both-tucker" and mod == CONV:
            assert "lokr_t2" in parts and "lokr_w1_a" in parts
        for part, tensor in parts.items():
            sd[f"{KOHYA[mod]}.{part}"] = tensor
        sd[f"{KOHYA[mod]}.alpha"] = torch.tensor(3.0)
        expected[mod] = delta
    name = _write(sd_env, f"tiny-{case}.safetensors", sd)
    new_model, new_clip = lora_loader(model, clip, name, 0.8, -0.6)
    for mod, got in _changes(model, clip, new_model, new_clip, expected).items():
        strength = -0.6 if mod == TE else 0.8
        torch.testing.assert_close(got, strength * expected[mod], atol=1e-6, rtol=1e-4, msg=f"{case} {mod}")
        assert got.abs().max() > 0


def test_peft_lora_layout_with_unet_prefix_matches_peft(sd_env, base):
    model, _ = base
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["target"])
    parts, delta = _peft_layer(_module(model, None, CONV), config, seed=4)
    name = _write(sd_env, "tiny-peft-conv.safetensors",
                  {f"unet.{CONV}.lora_A.weight": parts["lora_A"], f"unet.{CONV}.lora_B.weight": parts["lora_B"],
                   f"unet.{CONV}.alpha": torch.tensor(6.0)})
    new_model = lora_loader_model_only(model, name, 1.0)
    torch.testing.assert_close(_changes(model, None, new_model, None, [CONV])[CONV], delta, atol=1e-6, rtol=1e-4)


def test_locon_tucker_mid_equals_the_three_convolutions(sd_env, base):
    model, _ = base
    conv = _module(model, None, CONV)
    out_ch, in_ch, k, _ = conv.weight.shape
    gen = torch.Generator().manual_seed(5)
    rank, alpha = 3, 1.5
    down = torch.randn(rank, in_ch, 1, 1, generator=gen) * 0.1
    mid = torch.randn(rank, rank, k, k, generator=gen) * 0.1
    up = torch.randn(out_ch, rank, 1, 1, generator=gen) * 0.1
    key = KOHYA[CONV]
    name = _write(sd_env, "tiny-locon-tucker.safetensors",
                  {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(alpha)})
    new_model = lora_loader_model_only(model, name, 1.0)
    delta = _changes(model, None, new_model, None, [CONV])[CONV]
    x = torch.randn(2, in_ch, 9, 9, generator=gen)
    pad = conv.padding
    # the adapter as LyCORIS runs it: 1x1 down, kxk mid, 1x1 up
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=pad), up) * (alpha / rank)
    torch.testing.assert_close(F.conv2d(x, delta, padding=pad), composed, atol=1e-5, rtol=1e-4)


def test_lokr_with_both_factors_whole_ignores_alpha(sd_env, base):
    model, _ = base
    w = _module(model, None, ATTN).weight
    gen = torch.Generator().manual_seed(6)
    w1 = torch.randn(4, 2, generator=gen)
    w2 = torch.randn(w.shape[0] // 4, w.shape[1] // 2, generator=gen) * 0.1
    key = KOHYA[ATTN]
    name = _write(sd_env, "tiny-lokr-full.safetensors",
                  {f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(7.0)})
    new_model = lora_loader_model_only(model, name, 0.5)
    torch.testing.assert_close(_changes(model, None, new_model, None, [ATTN])[ATTN], 0.5 * torch.kron(w1, w2),
                               atol=1e-6, rtol=1e-4)


def _dora_reference(w, delta, magnitude, strength, output_axis):
    """DoRA: W' = m * (W + dW) / ||.||, then strength interpolates between W and W'. The norm is
    taken per input column for (1, in) magnitudes (kohya/LyCORIS) and, as ComfyUI does, from the base
    weight's rows for (out,) magnitudes."""
    adapted = w + delta
    if output_axis:
        norm = w.norm(dim=1, keepdim=True)
        m = magnitude.reshape(-1, 1)
    else:
        norm = adapted.norm(dim=0, keepdim=True)
        m = magnitude.reshape(1, -1)
    return w + strength * (adapted * m / (norm + torch.finfo(torch.float32).eps) - w)


@pytest.mark.parametrize("output_axis", [False, True])
def test_dora_scale_renormalises_along_the_axis_its_shape_names(sd_env, base, output_axis):
    model, _ = base
    w = _module(model, None, ATTN).weight.detach().clone()   # the module is patched in place below
    gen = torch.Generator().manual_seed(8)
    rank, alpha = 2, 1.0
    down = torch.randn(rank, w.shape[1], generator=gen) * 0.1
    up = torch.randn(w.shape[0], rank, generator=gen) * 0.1
    magnitude = (torch.rand(w.shape[0] if output_axis else w.shape[1], generator=gen) + 0.5)
    stored = magnitude if output_axis else magnitude.reshape(1, -1)
    key = KOHYA[ATTN]
    name = _write(sd_env, f"tiny-dora-{output_axis}.safetensors",
                  {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(alpha), f"{key}.dora_scale": stored})
    delta = (up @ down) * (alpha / rank)
    for strength in (1.0, 0.4):
        new_model = lora_loader_model_only(model, name, strength)
        got = _module(new_model, None, ATTN).weight.detach()
        torch.testing.assert_close(got, _dora_reference(w, delta, magnitude, strength, output_axis),
                                   atol=1e-5, rtol=1e-4)
    if not output_axis:   # at full strength each input column's norm is the stored magnitude
        torch.testing.assert_close(lora_loader_model_only(model, name, 1.0).unet.get_submodule(ATTN)
                                   .weight.detach().norm(dim=0), magnitude, atol=1e-4, rtol=1e-4)


def test_a_checkpoint_given_as_a_lora_is_refused_naming_node_input_and_file(sd_env, base):
    _, config = sd_env
    model, clip = base
    target = config.models_dir / "loras" / "actually-a-checkpoint.safetensors"
    target.write_bytes((config.models_dir / "checkpoints" / TINY_SD1).read_bytes())
    lora_models.clear_cache()
    with pytest.raises(ModelFileError) as info:
        lora_loader(model, clip, target.name, 1.0, 1.0)
    text = str(info.value)
    for part in ("LoraLoader", "lora_name", "actually-a-checkpoint.safetensors", "not a LoRA file", "expected a LoRA"):
        assert part in text
    with pytest.raises(ModelFileError, match="LoraLoaderModelOnly input lora_name"):
        lora_loader_model_only(model, target.name, 1.0)


def _with_lora_loader(ui: dict, lora_name: str) -> dict:
    """txt2img's UI graph with a LoraLoader between the checkpoint and its MODEL/CLIP consumers."""
    ui = copy.deepcopy(ui)
    ckpt = next(n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple")
    lid = ui["last_link_id"]
    model_link, clip_link = lid + 1, lid + 2
    lora = {"id": ui["last_node_id"] + 1, "type": "LoraLoader", "pos": [400, 100], "size": [315, 126], "flags": {},
            "order": 1, "mode": 0,
            "inputs": [{"name": "model", "type": "MODEL", "link": model_link},
                       {"name": "clip", "type": "CLIP", "link": clip_link}],
            "outputs": [{"name": "MODEL", "type": "MODEL", "links": [], "slot_index": 0},
                        {"name": "CLIP", "type": "CLIP", "links": [], "slot_index": 1}],
            "properties": {"Node name for S&R": "LoraLoader"}, "widgets_values": [lora_name, 0.9, 0.7]}
    for link in ui["links"]:
        if link[1] == ckpt["id"] and link[2] in (0, 1):
            link[1] = lora["id"]
            lora["outputs"][link[2]]["links"].append(link[0])
    for out in ckpt["outputs"][:2]:
        out["links"] = [model_link] if out["type"] == "MODEL" else [clip_link]
    ui["links"] += [[model_link, ckpt["id"], 0, lora["id"], 0, "MODEL"],
                    [clip_link, ckpt["id"], 1, lora["id"], 1, "CLIP"]]
    ui["nodes"].append(lora)
    ui["last_node_id"], ui["last_link_id"] = lora["id"], clip_link
    return ui


def test_ui_workflow_with_a_loha_lora_runs_end_to_end(sd_env, base, caplog):
    registry, config = sd_env
    model, clip = base
    sd = {}
    for i, mod in enumerate((ATTN, CONV, TE)):
        parts, _ = _peft_layer(_module(model, clip, mod), PEFT_CASES["loha"](), seed=20 + i)
        sd.update({f"{KOHYA[mod]}.{p}": t * 5 for p, t in parts.items()})
        sd[f"{KOHYA[mod]}.alpha"] = torch.tensor(2.0)
    name = _write(sd_env, "tiny-loha-e2e.safetensors", sd)
    ui = _with_lora_loader(json.loads((WORKFLOWS / "txt2img.json").read_text()), name)
    prompt = shrink(ui_to_api(ui, registry.object_info()), steps=2)
    lora_id = next(k for k, v in prompt.items() if v["class_type"] == "LoraLoader")
    assert prompt[lora_id]["inputs"]["lora_name"] == name
    sampler = next(v for v in prompt.values() if v["class_type"] == "KSampler")
    assert sampler["inputs"]["model"] == [lora_id, 0]

    def images(p, pid):
        result = Executor(registry).execute(p, pid)
        assert result.error is None, result.error
        saved = [i for out in result.outputs.values() for i in out.get("images", [])]
        assert saved
        return (config.output_dir / saved[0].get("subfolder", "") / saved[0]["filename"]).read_bytes()

    with caplog.at_level(logging.WARNING, logger="nodes.models.lora"):
        with_lora = images(prompt, "loha-e2e")
    assert "lora key not loaded" not in caplog.text
    without = copy.deepcopy(prompt)
    without[lora_id]["inputs"]["strength_model"] = 0.0
    without[lora_id]["inputs"]["strength_clip"] = 0.0
    assert images(without, "loha-e2e-off") != with_lora


def test_diffusers_sd3_transformer_prefix_resolves_and_merges():
    from nodes.models.tiny_sd3 import tiny_sd3_models

    transformer = tiny_sd3_models(seed=1)["transformer"]
    name = "transformer_blocks.0.attn.to_q"
    layer = transformer.get_submodule(name)
    parts, delta = _peft_layer(layer, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["target"]), seed=9)
    lora = lora_models.parse_lora({f"transformer.{name}.lora_A.weight": parts["lora_A"],
                                   f"transformer.{name}.lora_B.weight": parts["lora_B"]})
    new, _, unknown = lora_models.apply_lora(lora, transformer, None, 1.0, 0.0)
    assert not unknown and new is not None
    torch.testing.assert_close(new.get_submodule(name).weight - layer.weight, delta, atol=1e-6, rtol=1e-4)
