"""ModelFolders: ComfyUI layout, extra_model_paths.yaml, listings and safe lookups on real files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.paths import UnsafePathError
from nodes.models.folders import PT_EXTENSIONS, ModelFolders


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def bump_mtime(path: Path) -> None:
    # Some filesystems have coarse mtimes; move the directory's mtime forward explicitly.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_default_layout(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    models = tmp_path / "models"
    assert folders.paths("checkpoints") == [models / "checkpoints"]
    assert folders.paths("text_encoders") == [models / "text_encoders", models / "clip"]
    assert folders.paths("clip") == folders.paths("text_encoders")  # legacy key
    assert folders.paths("unet") == [models / "unet", models / "diffusion_models"]
    assert folders.paths("controlnet") == [models / "controlnet", models / "t2i_adapter"]
    assert folders.extensions("configs") == {".yaml"}
    assert folders.extensions("loras") == PT_EXTENSIONS
    for key in ("vae", "loras", "upscale_models", "embeddings", "diffusers", "vae_approx", "configs"):
        assert folders.paths(key) == [models / key]
    folders.ensure_dirs()
    assert (models / "checkpoints").is_dir() and (models / "text_encoders").is_dir()


def test_list_files_recursive_filtered_sorted(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    root = tmp_path / "models" / "checkpoints"
    touch(root / "b.safetensors")
    touch(root / "A.ckpt")
    touch(root / "sub" / "deep" / "c.SFT")
    touch(root / "notes.txt")
    touch(root / ".git" / "hidden.safetensors")
    assert folders.list_files("checkpoints") == sorted(
        ["A.ckpt", "b.safetensors", os.path.join("sub", "deep", "c.SFT")]
    )


def test_list_files_follows_symlinks_without_looping(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    root = tmp_path / "models" / "loras"
    elsewhere = tmp_path / "collection"
    touch(elsewhere / "style.safetensors")
    root.mkdir(parents=True)
    (root / "shared").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    touch(root / "own.pt")
    names = folders.list_files("loras")
    assert names == sorted(["own.pt", os.path.join("shared", "style.safetensors")])
    # An operator-made link resolves even though its target lies outside the folder.
    assert folders.full_path("loras", "shared/style.safetensors") == (elsewhere / "style.safetensors").resolve()


def test_listing_cache_invalidated_by_mtime(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    root = tmp_path / "models" / "vae"
    touch(root / "sub" / "one.safetensors")
    assert folders.list_files("vae") == [os.path.join("sub", "one.safetensors")]
    touch(root / "sub" / "two.safetensors")
    bump_mtime(root / "sub")
    assert folders.list_files("vae") == [os.path.join("sub", "one.safetensors"), os.path.join("sub", "two.safetensors")]
    # A folder that did not exist at listing time and appears later is noticed too.
    assert folders.list_files("upscale_models") == []
    touch(tmp_path / "models" / "upscale_models" / "x4.pth")
    assert folders.list_files("upscale_models") == ["x4.pth"]


def test_listing_is_cached(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    root = tmp_path / "models" / "embeddings"
    touch(root / "a.pt")
    folders.list_files("embeddings")
    # Sneak a file in and restore the directory mtime: the cached listing is served.
    st = root.stat()
    touch(root / "b.pt")
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert folders.list_files("embeddings") == ["a.pt"]
    folders.invalidate("embeddings")
    assert folders.list_files("embeddings") == ["a.pt", "b.pt"]


def test_diffusers_lists_model_folders(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    root = tmp_path / "models" / "diffusers"
    touch(root / "sd15" / "model_index.json", b"{}")
    touch(root / "sd15" / "unet" / "model_index.json", b"{}")  # inside a model: not separate
    touch(root / "org" / "xl" / "model_index.json", b"{}")
    touch(root / "junk" / "readme.md")
    assert folders.list_files("diffusers") == sorted(["sd15", os.path.join("org", "xl")])
    assert folders.full_path("diffusers", "sd15") == (root / "sd15").resolve()


EXTRA_YAML = """
a111:
    base_path: {a1111}
    checkpoints: models/Stable-diffusion
    loras: |
        models/Lora
        models/LyCORIS
    vae: models/VAE
    my_custom_type: extras/custom

shared:
    base_path: ~/sdflow-test-models
    is_default: true
    checkpoints: ckpts

env:
    base_path: $SDFLOW_TEST_MODELS/envbase
    embeddings: emb

relative:
    base_path: rel
    controlnet: cn

nobase:
    upscale_models: up
    clip: legacy_clip
    unet: legacy_unet

empty:
"""


def test_extra_model_paths_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SDFLOW_TEST_MODELS", str(tmp_path / "env"))
    a1111 = tmp_path / "webui"
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    yaml_path = cfg_dir / "extra_model_paths.yaml"
    yaml_path.write_text(EXTRA_YAML.format(a1111=a1111), encoding="utf-8")

    folders = ModelFolders(tmp_path / "comfy")
    folders.add_extra_paths_yaml(yaml_path)
    default_ckpt = tmp_path / "comfy" / "models" / "checkpoints"

    # is_default puts its path first; others are appended after the defaults.
    assert folders.paths("checkpoints") == [
        home / "sdflow-test-models" / "ckpts",
        default_ckpt,
        a1111 / "models" / "Stable-diffusion",
    ]
    assert folders.paths("loras")[1:] == [a1111 / "models" / "Lora", a1111 / "models" / "LyCORIS"]
    assert folders.paths("vae")[-1] == a1111 / "models" / "VAE"
    assert folders.paths("embeddings")[-1] == tmp_path / "env" / "envbase" / "emb"
    assert folders.paths("controlnet")[-1] == cfg_dir / "rel" / "cn"  # base_path relative to the YAML
    assert folders.paths("upscale_models")[-1] == cfg_dir / "up"  # no base_path: YAML directory
    assert folders.paths("text_encoders")[-1] == cfg_dir / "legacy_clip"
    assert folders.paths("diffusion_models")[-1] == cfg_dir / "legacy_unet"
    # Unknown keys create a new folder type that accepts any file.
    assert folders.paths("my_custom_type") == [a1111 / "extras" / "custom"]
    touch(a1111 / "extras" / "custom" / "thing.onnx")
    assert folders.list_files("my_custom_type") == ["thing.onnx"]

    # Files from every directory are merged (deduplicated); the first directory wins on lookup.
    touch(default_ckpt / "same.safetensors", b"default")
    touch(a1111 / "models" / "Stable-diffusion" / "same.safetensors", b"a1111")
    touch(a1111 / "models" / "Stable-diffusion" / "only_webui.safetensors")
    touch(home / "sdflow-test-models" / "ckpts" / "first.safetensors")
    assert folders.list_files("checkpoints") == ["first.safetensors", "only_webui.safetensors", "same.safetensors"]
    assert folders.full_path("checkpoints", "same.safetensors").read_bytes() == b"default"
    webui = folders.full_path("checkpoints", "only_webui.safetensors")
    assert webui.parent == (a1111 / "models" / "Stable-diffusion").resolve()
    assert folders.full_path("checkpoints", "missing.safetensors") is None
    with pytest.raises(FileNotFoundError):
        folders.require("checkpoints", "missing.safetensors")

    # Loading the same file again does not duplicate paths; is_default moves an existing path first.
    folders.add_extra_paths_yaml(yaml_path)
    assert folders.paths("checkpoints").count(default_ckpt) == 1
    assert len(folders.paths("checkpoints")) == 3
    folders.add_path("checkpoints", a1111 / "models" / "Stable-diffusion", is_default=True)
    assert folders.paths("checkpoints")[0] == a1111 / "models" / "Stable-diffusion"


def test_bad_yaml_shapes(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    p = tmp_path / "x.yaml"
    p.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ValueError):
        folders.add_extra_paths_yaml(p)
    p.write_text("", encoding="utf-8")
    folders.add_extra_paths_yaml(p)  # empty file: nothing to add
    assert folders.paths("checkpoints") == [tmp_path / "models" / "checkpoints"]


HOSTILE = [
    "../secret.safetensors",
    "sub/../../secret.safetensors",
    "..\\secret.safetensors",
    "/etc/passwd",
    "\\\\server\\share\\x.safetensors",
    "C:\\Windows\\x.safetensors",
    "ok\x00.safetensors",
    "",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_refused(tmp_path: Path, name: str) -> None:
    folders = ModelFolders(tmp_path / "comfy")
    touch(tmp_path / "comfy" / "models" / "secret.safetensors")
    touch(tmp_path / "comfy" / "models" / "checkpoints" / "ok.safetensors")
    with pytest.raises(UnsafePathError):
        folders.full_path("checkpoints", name)


def test_hostile_name_refused_even_when_no_folder_exists(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    with pytest.raises(UnsafePathError):
        folders.full_path("loras", "../../etc/passwd")


def test_symlink_escape_refused_without_follow_links(tmp_path: Path) -> None:
    touch(tmp_path / "outside" / "x.safetensors")
    root = tmp_path / "comfy" / "models" / "checkpoints"
    root.mkdir(parents=True)
    (root / "link.safetensors").symlink_to(tmp_path / "outside" / "x.safetensors")
    strict = ModelFolders(tmp_path / "comfy", follow_links=False)
    with pytest.raises(UnsafePathError):
        strict.full_path("checkpoints", "link.safetensors")
    relaxed = ModelFolders(tmp_path / "comfy")
    assert relaxed.full_path("checkpoints", "link.safetensors") == (tmp_path / "outside" / "x.safetensors").resolve()


def test_broken_symlink_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "models" / "vae"
    root.mkdir(parents=True)
    (root / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    folders = ModelFolders(tmp_path)
    assert folders.full_path("vae", "gone.safetensors") is None


def test_repeated_listings_walk_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = ModelFolders(tmp_path)
    root = tmp_path / "models" / "loras"
    for i in range(200):
        touch(root / f"d{i % 10}" / f"f{i}.safetensors")
    first = folders.list_files("loras")
    assert len(first) == 200
    # Repeated listings read the directories' mtimes only: no directory is walked again.
    walks: list[object] = []
    real_scandir, real_walk = os.scandir, os.walk
    monkeypatch.setattr(os, "scandir", lambda *a, **k: walks.append(a) or real_scandir(*a, **k))
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a) or real_walk(*a, **k))
    for _ in range(50):
        assert folders.list_files("loras") == first
    assert walks == []
    folders.invalidate("loras")
    assert folders.list_files("loras") == first and walks   # the counter does see a real walk


def test_default_yaml_in_base_dir(tmp_path: Path) -> None:
    folders = ModelFolders(tmp_path)
    assert folders.load_default_yaml() is False
    (tmp_path / "extra_model_paths.yaml").write_text("x:\n  loras: more_loras\n", encoding="utf-8")
    assert folders.load_default_yaml() is True
    assert folders.paths("loras")[-1] == tmp_path / "more_loras"
