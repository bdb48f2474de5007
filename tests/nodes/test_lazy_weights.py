"""Single-file checkpoints read tensor by tensor (nodes/models/lazy_weights.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodes.models.checkpoint import load_checkpoint
from nodes.models.lazy_weights import LazySafetensors, open_weights
from nodes.models.state_dict import ModelFileError
from nodes.models.tiny import write_tiny_checkpoint


def test_lazy_reads_equal_safetensors_own_reads(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "t.safetensors", "sd1")
    lazy, whole = LazySafetensors(path), load_file(str(path))
    assert set(lazy) == set(whole) and len(lazy) == len(whole)
    for key, tensor in whole.items():
        got = lazy[key]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key


def test_tensors_are_cast_as_they_are_read(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"a": torch.randn(3, 4).half(), "b": torch.arange(5), "c": torch.tensor(True)}, str(path))
    lazy = open_weights(path, cast=lambda key: torch.float32)
    assert lazy["a"].dtype == torch.float32 and torch.equal(lazy["a"], load_file(str(path))["a"].float())
    assert lazy["b"].dtype == torch.int64 and lazy["b"].tolist() == [0, 1, 2, 3, 4]   # ints stay ints
    assert lazy["c"].item() is True and lazy["a"].data_ptr() % 64 == 0


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated"):
        LazySafetensors(path)


def test_a_checkpoint_loaded_lazily_matches_one_loaded_whole(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "t.safetensors", "sdxl")
    ckpt = load_checkpoint(path)
    whole = load_file(str(path))
    unet = ckpt.unet.state_dict()
    assert all(t.dtype == torch.float32 for t in unet.values())
    # every UNet weight of the file (LDM names) arrived: same count of floats in both
    n_file = sum(t.numel() for k, t in whole.items() if k.startswith("model.diffusion_model."))
    assert n_file == sum(t.numel() for t in unet.values())
