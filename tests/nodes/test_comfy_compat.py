"""The ComfyUI helper modules for custom-node packs, in process: folder_paths over sdflow's model folders,
the stubs for the rest of ComfyUI, comfy.utils' weights-only loading and progress bar, and the cost of
`import nodes` / `import server` with no pack loaded."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import RuntimeConfig
from engine.progress import NodeContext, _current
from nodes import runtime as rt


@pytest.fixture()
def configured(tmp_path: Path):
    previous = rt._runtime
    config = RuntimeConfig(data_dir=tmp_path / "data")
    runtime = rt.configure(config)
    try:
        yield runtime
    finally:
        rt._runtime = previous


def test_folder_paths_is_live_over_sdflows_folders(configured, tmp_path: Path) -> None:
    from nodes.comfy_compat import folder_paths

    extra = tmp_path / "pack_models"
    (extra / "sub").mkdir(parents=True)
    (extra / "sub" / "a.bin").write_bytes(b"0")
    (extra / "b.txt").write_text("x")
    folder_paths.add_model_folder_path("pack_models", str(extra))
    assert configured.folders.list_files("pack_models") == ["b.txt", "sub/a.bin"]   # sdflow sees it too
    assert folder_paths.get_folder_paths("pack_models") == [str(extra)]
    folder_paths.folder_names_and_paths["pack_models"] = ([str(extra)], {".bin"})
    assert folder_paths.get_filename_list("pack_models") == ["sub/a.bin"]
    assert folder_paths.folder_names_and_paths["pack_models"] == ([str(extra)], {".bin"})
    assert folder_paths.get_full_path("pack_models", "sub/a.bin") == str((extra / "sub" / "a.bin").resolve())
    assert folder_paths.get_full_path("pack_models", "../pack_models/b.txt") is None
    with pytest.raises(FileNotFoundError, match="pack_models"):
        folder_paths.get_full_path_or_raise("pack_models", "missing.bin")
    assert "checkpoints" in folder_paths.folder_names_and_paths
    assert folder_paths.models_dir == str(configured.folders.models_dir)
    assert folder_paths.get_output_directory() == str(configured.output_dir)
    assert folder_paths.get_annotated_filepath("x.png [output]") == str(configured.output_dir / "x.png")
    assert folder_paths.get_annotated_filepath("x.png") == str(configured.input_dir / "x.png")
    assert folder_paths.filter_files_extensions(["a.PT", "b.txt"], [".pt"]) == ["a.PT"]


def test_get_save_image_path_counts_on_and_stays_in_the_folder(configured) -> None:
    from nodes.comfy_compat import folder_paths

    out = str(configured.output_dir)
    folder, name, counter, sub, _ = folder_paths.get_save_image_path("shots/cat", out, 64, 64)
    assert (Path(folder), name, counter, sub) == (configured.output_dir / "shots", "cat", 1, "shots")
    Path(folder).mkdir(parents=True)
    (Path(folder) / "cat_00007_.png").write_bytes(b"")
    assert folder_paths.get_save_image_path("shots/cat", out)[2] == 8
    with pytest.raises(ValueError, match="outside the output folder"):
        folder_paths.get_save_image_path("../../escape", out)


def test_unknown_comfy_modules_import_as_stubs_that_refuse_clearly() -> None:
    from nodes.comfy_compat.stubs import FINDER, NotSupportedBySdflow, install_finder

    install_finder()
    try:
        module = importlib.import_module("comfy_extras.nodes_sdflow_test_only")
        with pytest.raises(NotSupportedBySdflow, match="nodes_sdflow_test_only.Thing is not supported by sdflow"):
            module.Thing(1)
        with pytest.raises(NotSupportedBySdflow, match="helper is not supported"):
            module.helper()

        class Mine(module.Base):   # a pack subclassing a placeholder still defines its class
            def __init__(self, x):
                self.x = x
        assert Mine(3).x == 3
    finally:
        sys.meta_path.remove(FINDER)
        for name in [m for m in sys.modules if m == "comfy_extras" or m.startswith("comfy_extras.")]:
            sys.modules.pop(name)


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_load_torch_file_is_weights_only(tmp_path: Path) -> None:
    from nodes.comfy_compat.utils import load_torch_file

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_torch_file(str(good))["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(Exception) as err:
        load_torch_file(str(bad), safe_load=False)
    assert "unpickled" not in str(err.value)


def test_progress_bar_reports_through_engine_progress() -> None:
    from nodes.comfy_compat.utils import ProgressBar

    seen = []
    token = _current.set(NodeContext("7", "p", lambda: None, lambda v, t, p: seen.append((v, t))))
    try:
        bar = ProgressBar(4)
        bar.update(1)
        bar.update_absolute(3)
        bar.update(5)
    finally:
        _current.reset(token)
    assert seen == [(1, 4), (3, 4), (4, 4)]


def test_conditioning_set_values_copies() -> None:
    from nodes.comfy_compat.node_helpers import conditioning_set_values

    cond = [[torch.zeros(1), {"a": 1, "areas": [1]}]]
    out = conditioning_set_values(cond, {"b": 2, "areas": [2]}, append=True)
    assert out[0][1] == {"a": 1, "b": 2, "areas": [1, 2]} and cond[0][1] == {"a": 1, "areas": [1]}


def test_import_nodes_and_server_stays_light() -> None:
    code = ("import sys, nodes, server; assert nodes.MAX_RESOLUTION == 16384; "
            "print(sorted(m for m in ('torch', 'aiohttp', 'folder_paths', 'comfy', 'nodes.comfy_compat') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_custom_node_folders_default_given_and_from_extra_model_paths(tmp_path: Path) -> None:
    from nodes.comfy_compat import custom_node_folders
    from nodes.models.folders import ModelFolders

    (tmp_path / "extra.yaml").write_text("mine:\n  base_path: /srv/comfy\n  custom_nodes: custom_nodes\n")
    folders = ModelFolders(tmp_path / "data")
    assert custom_node_folders(folders) == [tmp_path / "data" / "custom_nodes"]
    folders.add_extra_paths_yaml(tmp_path / "extra.yaml")
    from_yaml = Path("/srv/comfy/custom_nodes")
    assert custom_node_folders(folders) == [tmp_path / "data" / "custom_nodes", from_yaml]
    assert custom_node_folders(folders, [tmp_path / "packs"]) == [tmp_path / "packs", from_yaml]


def test_unprovided_members_of_shim_modules_refuse_clearly() -> None:
    from nodes.comfy_compat import model_management, samplers
    from nodes.comfy_compat.stubs import NotSupportedBySdflow

    with pytest.raises(NotSupportedBySdflow, match="comfy.model_management.get_autocast_device is not supported"):
        model_management.get_autocast_device(None)
    with pytest.raises(NotSupportedBySdflow, match="KSampler objects are not supported"):
        samplers.KSampler(None, 20, "cpu")
    assert "euler" in samplers.KSampler.SAMPLERS and "karras" in samplers.KSampler.SCHEDULERS
    assert model_management.get_torch_device().type in ("cpu", "cuda", "mps")
    assert not model_management.processing_interrupted()
    model_management.interrupt_current_processing()
    with pytest.raises(model_management.InterruptProcessingException):
        model_management.throw_exception_if_processing_interrupted()
    model_management.throw_exception_if_processing_interrupted()   # the request was consumed
