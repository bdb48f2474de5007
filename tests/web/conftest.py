"""Fixtures for the browser tests: Debian's Chromium, a built editor, a tiny checkpoint and a real
`sdflow serve` subprocess on 127.0.0.1.

Set-up installs what a fresh machine lacks: `apt-get install chromium` when /usr/bin/chromium is
missing, and `npm ci && npm run build` when web/dist is missing or older than the editor sources.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
DIST = WEB / "dist"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
PYTHON = sys.executable


# ---- machine set-up ----------------------------------------------------------------------------------

def ensure_chromium() -> Path:
    """Debian's Chromium (Playwright's own browser download is not used)."""
    if CHROMIUM.exists():
        return CHROMIUM
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, timeout=1200,
                          capture_output=True, text=True)
    if not CHROMIUM.exists():
        pytest.fail(f"could not install chromium (apt-get exit {proc.returncode}): {proc.stderr[-2000:]}")
    return CHROMIUM


def _newest_mtime(paths: list[Path]) -> float:
    newest = 0.0
    for p in paths:
        if p.is_dir():
            for f in p.rglob("*"):
                if f.is_file():
                    newest = max(newest, f.stat().st_mtime)
        elif p.exists():
            newest = max(newest, p.stat().st_mtime)
    return newest


def editor_is_stale() -> bool:
    built = [DIST / "index.html", DIST / "app.js", DIST / "app.css"]
    if not all(p.exists() for p in built):
        return True
    sources = [WEB / "src", WEB / "package.json", WEB / "package-lock.json", WEB / "build.mjs"]
    return _newest_mtime(sources) > min(p.stat().st_mtime for p in built)


def ensure_editor_built() -> Path:
    if editor_is_stale():
        npm = shutil.which("npm")
        if not npm:
            pytest.fail("npm is needed to build the editor (web/): install Node.js and npm")
        lock = WEB / "package-lock.json"
        modules = WEB / "node_modules" / ".package-lock.json"
        if not modules.exists() or lock.stat().st_mtime > modules.stat().st_mtime:
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True, timeout=900)
        subprocess.run([npm, "run", "build"], cwd=WEB, check=True, timeout=600)
    return DIST


# ---- the server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, models_dir: Path, token: str | None = None, name: str = "server") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.data_dir = data_dir
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        cmd = [PYTHON, "-m", "server", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
               "--models-dir", str(models_dir), "--web-root", str(DIST)]
        if token:
            cmd += ["--auth-token", token]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("SDFLOW_AUTH_TOKEN", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdflow serve exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                self.get("/api/object_info")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"sdflow serve did not answer within {timeout}s: {self.log_path.read_text()[-3000:]}")

    def request(self, path: str, body: Any = None, method: str | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request(path) or b"null")

    def post(self, path: str, body: Any) -> Any:
        raw = self.request(path, body)
        return json.loads(raw) if raw.strip() else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture(scope="session")
def chromium() -> Path:
    return ensure_chromium()


@pytest.fixture(scope="session")
def editor_dist() -> Path:
    return ensure_editor_built()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding one tiny SD1 checkpoint in the original single-file layout."""
    from nodes.models.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    write_tiny_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd1")
    return root


@pytest.fixture(scope="session")
def server(editor_dist: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("data"), models_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser(chromium: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        yield b
        b.close()


class EditorPage:
    """A page of the editor plus what it logged; `errors` are console errors and uncaught exceptions."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.console: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _on_console(self, msg: Any) -> None:
        self.console.append(f"{msg.type}: {msg.text}")
        if msg.type == "error":
            self.errors.append(msg.text)

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_function("window.sdflow && document.body.classList.contains('ready')", timeout=30000)

    def js(self, expr: str, arg: Any = None) -> Any:
        return self.page.evaluate(expr, arg) if arg is not None else self.page.evaluate(expr)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def editor(browser: Any, server: Server, request: pytest.FixtureRequest) -> Iterator[EditorPage]:
    context = browser.new_context(viewport={"width": 1600, "height": 950})
    page = context.new_page()
    ed = EditorPage(page)
    ed.open(server.url + "/")
    yield ed
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        ed.screenshot(f"FAILED_{request.node.name}.png")
    context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
