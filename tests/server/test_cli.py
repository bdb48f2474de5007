"""`sdflow run / validate / nodes` as real subprocesses, with the test nodes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from engine.png_metadata import embed_png_text, png_text_chunks
from engine.registry import Registry
from engine.ui_workflow import api_to_ui

from . import plugin_nodes
from .conftest import chain

ROOT = Path(__file__).resolve().parents[2]


def sdflow(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    data = tmp_path / "data"
    env = dict(os.environ, SDFLOW_TEST_INPUT_DIR=str(data / "input"), SDFLOW_TEST_OUTPUT_DIR=str(data / "output"),
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "server", *args[:1], "--data-dir", str(data), "--no-builtin-nodes",
           "--nodes-module", "tests.server.plugin_nodes", *args[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_run_api_json_with_set_prints_outputs(tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(chain(5, steps=3, delay=0.01, out="TestSaveImage")))
    r = sdflow(tmp_path, "run", str(wf), "--set", "1.value=200")
    assert r.returncode == 0, r.stderr
    paths = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(paths) == 1 and Path(paths[0]).is_file()
    assert Path(paths[0]).parent == (tmp_path / "data" / "output").resolve()
    assert Image.open(paths[0]).getpixel((0, 0))[0] == 210
    assert "3/3" in r.stderr and "> 2 TestSlow" in r.stderr and "success" in r.stderr


def test_run_ui_workflow_and_png(tmp_path):
    info = Registry.from_nodes(plugin_nodes).object_info()
    ui = api_to_ui(chain(1), info)
    wf = tmp_path / "ui.json"
    wf.write_text(json.dumps(ui))
    r = sdflow(tmp_path, "run", str(wf))
    assert r.returncode == 0, r.stderr
    assert 'text: ["11"]' in r.stderr

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = embed_png_text(buf.getvalue(), png_text_chunks(chain(3), None))
    (tmp_path / "wf.png").write_bytes(png)
    r = sdflow(tmp_path, "run", str(tmp_path / "wf.png"), "--set", "3.b=100")
    assert r.returncode == 0, r.stderr
    assert 'text: ["103"]' in r.stderr


def test_exit_codes_on_errors(tmp_path):
    bad = chain(1)
    bad["3"]["inputs"]["b"] = "x"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = sdflow(tmp_path, "validate", str(tmp_path / "bad.json"))
    assert r.returncode == 1 and "node 3 (TestAdd)" in r.stderr
    r = sdflow(tmp_path, "run", str(tmp_path / "bad.json"))
    assert r.returncode != 0 and "node 3" in r.stderr

    failing = {"1": {"class_type": "TestFail", "inputs": {"value": 1, "message": "nope"}},
               "2": {"class_type": "TestShow", "inputs": {"value": ["1", 0]}}}
    (tmp_path / "fail.json").write_text(json.dumps(failing))
    r = sdflow(tmp_path, "run", str(tmp_path / "fail.json"))
    assert r.returncode != 0 and "error in node 1 (TestFail)" in r.stderr and "nope" in r.stderr

    (tmp_path / "ok.json").write_text(json.dumps(chain(1)))
    r = sdflow(tmp_path, "validate", str(tmp_path / "ok.json"))
    assert r.returncode == 0 and "outputs 4" in r.stdout
    r = sdflow(tmp_path, "run", str(tmp_path / "missing.json"))
    assert r.returncode != 0 and "cannot read" in r.stderr
    (tmp_path / "junk.json").write_text("{nope")
    r = sdflow(tmp_path, "validate", str(tmp_path / "junk.json"))
    assert r.returncode != 0
    r = sdflow(tmp_path, "run", str(tmp_path / "ok.json"), "--set", "nodot")
    assert r.returncode != 0 and "NODE.INPUT=VALUE" in r.stderr


def test_nodes_lists_types(tmp_path):
    r = sdflow(tmp_path, "nodes")
    assert r.returncode == 0
    names = {line.split()[1] for line in r.stdout.splitlines()}
    assert {"TestConst", "TestSlow", "TestShow"} <= names
    r = sdflow(tmp_path, "nodes", "--json")
    assert "TestAdd" in json.loads(r.stdout)


def test_make_demo_model_if_missing_leaves_real_collections_alone(tmp_path):
    data = tmp_path / "data"
    first = subprocess.run([sys.executable, "-m", "server", "make-demo-model", "--data-dir", str(data), "--if-missing"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    demo = data / "models" / "checkpoints" / "sdflow-demo-RANDOM-WEIGHTS-sd15.safetensors"
    assert demo.is_file() and "RANDOM-WEIGHTS" in first.stdout

    other = tmp_path / "collection"
    (other / "models" / "checkpoints").mkdir(parents=True)
    (other / "models" / "checkpoints" / "real.safetensors").write_bytes(b"not checked here")
    second = subprocess.run([sys.executable, "-m", "server", "make-demo-model", "--data-dir", str(other),
                             "--if-missing"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (other / "models" / "checkpoints").iterdir()) == ["real.safetensors"]
