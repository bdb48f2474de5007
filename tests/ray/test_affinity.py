"""Routing by model affinity with the real SD nodes (tiny random-weight checkpoints) on 2 Ray workers,
and files through the head's folders: the input image goes with the prompt, saved images come back."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from engine.config import RuntimeConfig
from tests.nodes.conftest import shrink, write_input_images

from .conftest import backend, start_ray_server

ROOT = Path(__file__).resolve().parents[2]
CKPT_A, CKPT_B = "tiny-a.safetensors", "tiny-b.safetensors"


def workflow(name: str, ckpt: str, seed: int) -> dict:
    prompt = shrink(json.loads((ROOT / "workflows" / name).read_text()), size=64, steps=2)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt
        elif node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    return prompt


@pytest.mark.slow
async def test_same_checkpoint_goes_to_the_worker_that_loaded_it(ray_cluster, tmp_path):
    import nodes
    from nodes.models.tiny import write_tiny_checkpoint

    config = RuntimeConfig(data_dir=tmp_path / "head")
    config.ensure_dirs()
    write_tiny_checkpoint(config.models_dir / "checkpoints" / CKPT_A, "sd1", seed=0)
    write_tiny_checkpoint(config.models_dir / "checkpoints" / CKPT_B, "sd1", seed=1)
    write_input_images(config.input_dir)          # example.png, only in the head's input folder
    registry, catalog = nodes.build_registry(config, plugins=False)
    srv, runner = await start_ray_server(tmp_path, registry, config, builtin_nodes=True, catalog=catalog)
    try:
        entries = []
        for name, ckpt, seed in (("txt2img_api.json", CKPT_A, 1), ("txt2img_api.json", CKPT_A, 2),
                                 ("img2img_api.json", CKPT_B, 3)):
            queued = await srv.queue_prompt(workflow(name, ckpt, seed))
            entry = await srv.wait_history(queued["prompt_id"], timeout=240)
            assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]
            entries.append(entry)
        first, second, third = (e["dispatch"] for e in entries)
        assert first["reason"].startswith("least loaded")
        assert second["worker"] == first["worker"] and second["reason"].startswith("affinity")
        assert second["affinity_hits"] >= 1
        assert third["worker"] != first["worker"] and third["reason"].startswith("least loaded")
        assert {s.name: len(s.model_keys) > 0 for s in backend(srv).slots} == {"worker-0": True, "worker-1": True}

        # every saved image is in the head's output folder under its own name, served by /view
        images = [e["outputs"][nid]["images"][0] for e, nid in zip(entries, ("9", "9", "8"))]
        assert len({i["filename"] for i in images}) == 3
        assert images[0]["filename"] == "ComfyUI_00001_.png" and images[1]["filename"] == "ComfyUI_00002_.png"
        assert images[2]["filename"] == "img2img_00001_.png"
        for image in images:
            assert (config.output_dir / image["subfolder"] / image["filename"]).is_file()
            async with await srv.get("/view", params={"filename": image["filename"], "type": "output"}) as r:
                assert r.status == 200
                assert Image.open(io.BytesIO(await r.read())).size == (64, 64)
    finally:
        await srv.session.close()
        await runner.cleanup()
