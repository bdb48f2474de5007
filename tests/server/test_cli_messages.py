"""What `sdflow serve` and `make-demo-model` tell a person at start."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.cli import startup_lines

from .conftest import FakeCatalog

ROOT = Path(__file__).resolve().parents[2]
DEMO = "sdflow-demo-RANDOM-WEIGHTS-sd15.safetensors"


def test_demo_only_catalog_says_random_weights_make_noise():
    lines = startup_lines("127.0.0.1", 8188, FakeCatalog({"checkpoints": [DEMO], "diffusers": []}))
    assert "random weights" in lines[0] and "noise" in lines[0] and DEMO in lines[0]
    assert lines[-1] == "open http://127.0.0.1:8188 in your browser; press Ctrl+C to stop"


def test_real_models_get_no_demo_note_and_wildcard_hosts_point_at_loopback():
    lines = startup_lines("0.0.0.0", 9000, FakeCatalog({"checkpoints": [DEMO, "real.safetensors"]}))
    assert lines == ["open http://127.0.0.1:9000 in your browser; press Ctrl+C to stop"]
    assert startup_lines("::1", 1, None) == ["open http://[::1]:1 in your browser; press Ctrl+C to stop"]


def test_make_demo_model_says_what_it_wrote(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "server", "make-demo-model", "--data-dir", str(tmp_path / "d")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_file() and r.stdout.strip().endswith(DEMO)
    assert "random weights" in r.stderr and "noise" in r.stderr


def test_example_inputs_are_copied_once(tmp_path):
    from server.cli import EXAMPLE_INPUTS, install_example_inputs

    assert {p.name for p in EXAMPLE_INPUTS.glob("*.png")} == {"example.png", "example_masked.png"}
    inp = tmp_path / "input"
    inp.mkdir()
    (inp / "example_masked.png").write_bytes(b"the user's own file")
    assert install_example_inputs(inp) == ["example.png"]           # an existing file is never overwritten
    assert (inp / "example.png").read_bytes() == (EXAMPLE_INPUTS / "example.png").read_bytes()
    assert (inp / "example_masked.png").read_bytes() == b"the user's own file"
    (inp / "example.png").unlink()
    assert install_example_inputs(inp) == [] and not (inp / "example.png").exists()   # once only


def test_example_workflows_validate_with_the_shipped_inputs(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    data = tmp_path / "d"
    r = subprocess.run([sys.executable, "-m", "server", "make-demo-model", "--data-dir", str(data)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for wf in ("img2img_api.json", "inpainting_api.json"):
        r = subprocess.run([sys.executable, "-m", "server", "validate", str(ROOT / "workflows" / wf),
                            "--data-dir", str(data)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (wf, r.stderr)
    assert (data / "input" / "example.png").is_file() and (data / "input" / "example_masked.png").is_file()


def test_set_with_an_unknown_input_is_refused(tmp_path):
    import json

    from .conftest import chain

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(chain(1)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "server", "validate", str(wf), "--data-dir", str(tmp_path / "d"),
            "--no-builtin-nodes", "--nodes-module", "tests.server.plugin_nodes"]
    r = subprocess.run(base + ["--set", "3.bb=5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "has no input 'bb'; did you mean b" in r.stderr, r.stderr
    r = subprocess.run(base + ["--set", "TestAdd.b=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
