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
