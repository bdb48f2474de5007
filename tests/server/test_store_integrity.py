"""The queue database at start: a damaged file is kept aside and a new one started, a deleted or emptied
one is reported, and the server says so in words (never a traceback)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.store import Store, StoreUnusable

from .conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def filled(path: Path, n: int = 3) -> None:
    s = Store(path)
    for i in range(n):
        s.enqueue(i, f"p{i}", {"1": {}}, {}, ["1"])
    s.close()


def test_fresh_database_has_no_problem(tmp_path):
    s = Store(tmp_path / "q.db")
    assert s.problem is None and s.set_aside is None
    s.close()
    s = Store(tmp_path / "q.db")                      # reopened as it was left
    assert s.problem is None
    s.close()


@pytest.mark.parametrize("damage", ["garbage", "torn pages", "bad header"])
def test_damaged_database_is_kept_aside_and_a_new_one_started(tmp_path, damage):
    path = tmp_path / "q.db"
    filled(path, 200)
    raw = bytearray(path.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"this is not a database at all" * 100)
    elif damage == "torn pages":
        page = 4096
        for off in range(page, len(raw), page * 2):       # scribble over every other page after the first
            raw[off:off + 512] = b"\xa5" * 512
    else:
        raw[:16] = b"SQLite format 9\x00"
    path.write_bytes(bytes(raw))
    s = Store(path)
    assert s.problem and "damaged" in s.problem and s.set_aside is not None
    assert s.set_aside.name in s.problem and str(tmp_path) not in s.problem
    assert s.set_aside.read_bytes() == bytes(raw)        # the damaged file is kept as it was
    assert s.pending() == []
    s.enqueue(1, "new", {"1": {}}, {}, ["1"])              # the new store works
    assert [i.prompt_id for i in s.pending()] == ["new"]
    s.close()
    again = Store(path)
    assert again.problem is None and [i.prompt_id for i in again.pending()] == ["new"]
    again.close()


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_deleted_or_emptied_database_is_reported(tmp_path, how):
    path = tmp_path / "q.db"
    filled(path)
    for suffix in ("", "-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            extra.unlink()
    if how == "emptied":
        path.write_bytes(b"")
    s = Store(path)
    assert s.problem and how in s.problem and "start empty" in s.problem
    assert s.pending() == [] and s.history() == {}
    s.close()


def test_unusable_location_is_a_clear_error(tmp_path):
    path = tmp_path / "q.db"
    path.mkdir()                                           # a directory where the file should be
    with pytest.raises(StoreUnusable, match="q.db"):
        Store(path)


def test_serve_with_a_damaged_database_says_what_happened(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    filled(data / "sdflow.db")
    (data / "sdflow.db").write_bytes(b"\x00garbage" * 1000)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--no-builtin-nodes", "--data-dir", str(data),
                             "--port", str(port), "--web-root", str(tmp_path / "none")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving on" in line:
                break
        out = "".join(lines)
        assert "serving on" in out, out
        assert "damaged" in out and "kept aside as sdflow.db.damaged-" in out, out
        assert "Traceback" not in out
        assert list(data.glob("sdflow.db.damaged-*"))
    finally:
        proc.terminate()
        proc.wait(20)
