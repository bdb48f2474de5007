"""Errors about a model file name the file the workflow asked for (the name under the model folder),
not the target of a symlink that the operator put there."""
from __future__ import annotations

import pytest

from engine.executor import Executor
from nodes.runtime import runtime

from .conftest import TINY_SD1

LOADERS = [
    ("CheckpointLoaderSimple", "ckpt_name", "checkpoints"),
    ("VAELoader", "vae_name", "vae"),
    ("ControlNetLoader", "control_net_name", "controlnet"),
]


@pytest.fixture(scope="module")
def broken_target(sd_env, tmp_path_factory):
    target = tmp_path_factory.mktemp("elsewhere") / "real-target-file.safetensors"
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return target


@pytest.mark.parametrize("node,param,key", LOADERS)
def test_loader_error_names_the_linked_name_not_the_target(sd_env, broken_target, node, param, key):
    registry, config = sd_env
    folder = config.models_dir / key
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / f"linked-{key}.safetensors"
    if not link.exists():
        link.symlink_to(broken_target)
    folders = runtime().folders
    assert folders.full_path(key, link.name) == broken_target.resolve()   # still resolvable
    assert folders.require(key, link.name) == folder / link.name

    with pytest.raises(ValueError) as err:   # ModelFileError is a ValueError
        registry.get(node).fn(**{param: link.name})
    msg = str(err.value)
    assert link.name in msg, msg
    assert "real-target-file" not in msg, msg


def test_executor_error_for_a_linked_checkpoint_names_the_link(sd_env, broken_target):
    registry, config = sd_env
    link = config.models_dir / "checkpoints" / "linked-run.safetensors"
    if not link.exists():
        link.symlink_to(broken_target)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": link.name}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 1]}},
        "4": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["2", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    result = Executor(registry).execute(prompt, "linked-ckpt")
    assert result.status == "error" and result.error["node_id"] == "1"
    msg = result.error["exception_message"]
    assert "linked-run.safetensors" in msg and "corrupt" in msg
    assert "real-target-file" not in msg
    assert TINY_SD1  # the good checkpoint next to it is untouched
