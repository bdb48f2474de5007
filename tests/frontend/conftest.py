"""Fixtures for ComfyUI's official front end against sdflow: `comfyui-frontend-package` installed from the
registry when missing (never vendored), a tiny checkpoint, a real `sdflow serve --frontend comfyui`
subprocess on 127.0.0.1 and Debian's Chromium through Playwright.

The server and browser helpers are the editor tests' (tests/web/conftest.py), reused without change.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import ARTIFACTS, ROOT, ensure_chromium, free_port

FRONTEND_REQUIREMENT = "comfyui-frontend-package>=1.27.10,<1.28"   # as pyproject's extra comfyui-frontend
# Requests ComfyUI itself answers 4xx on a fresh user folder (no user.css, no saved node templates,
# no workflow index file); anything else 4xx/5xx is a failure.
ALLOWED_FAILURES = {"/user.css", "/favicon.ico", "/api/userdata/user.css", "/api/userdata/comfy.templates.json",
                    "/api/userdata/workflows%2F.index.json"}
NO_PREVIEW_PREFIX = "/api/experiment/models/preview/"   # 404 for a model without a preview image, as ComfyUI


def ensure_frontend_package() -> None:
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", FRONTEND_REQUIREMENT],
                              capture_output=True, text=True, timeout=900)
        importlib.invalidate_caches()
        if importlib.util.find_spec("comfyui_frontend_package") is None:
            pytest.fail(f"could not install {FRONTEND_REQUIREMENT}: {proc.stderr[-2000:]}")


class ComfyServer:
    """`sdflow serve --frontend comfyui` in a subprocess; the user folder starts as a returning ComfyUI
    user's (tutorial done), so the front end opens its default graph instead of the template browser."""

    def __init__(self, data_dir: Path, models_dir: Path, name: str = "comfyui-frontend-server",
                 extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.user_root = data_dir / "user" / "default"
        self.user_root.mkdir(parents=True, exist_ok=True)
        settings = self.user_root / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        cmd = [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
               "--models-dir", str(models_dir), "--frontend", "comfyui", *(extra_args or [])]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("SDFLOW_AUTH_TOKEN", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdflow serve exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/object_info", timeout=10):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"sdflow serve did not answer within {timeout}s")

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture(scope="session")
def comfy_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodes.models.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("comfy-models")
    write_tiny_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd1")
    return root


@pytest.fixture(scope="module")
def comfy_server(comfy_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    ensure_frontend_package()
    srv = ComfyServer(tmp_path_factory.mktemp("comfy-data"), comfy_models_dir)
    yield srv
    srv.stop()


# Module scope, not session: Playwright's sync API keeps an event loop running in this thread while it is
# open, and the asyncio tests collected after this folder (tests/server) need the thread free.
@pytest.fixture(scope="module")
def comfy_browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = ensure_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        yield b
        b.close()


class FrontendPage:
    """A page of ComfyUI's front end and every response it got (status, method, path and query)."""

    def __init__(self, browser: Any, server: ComfyServer) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.responses: list[tuple[int, str, str]] = []
        self.page_errors: list[str] = []
        self.page.on("response", self._on_response)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def _on_response(self, response: Any) -> None:
        url = response.url
        rel = url.removeprefix(self.server.url)
        self.responses.append((response.status, response.request.method, rel))

    def open(self) -> None:
        self.page.goto(self.server.url + "/")
        self.wait_graph()

    def reload(self) -> None:
        self.page.reload()
        self.wait_graph()

    def wait_graph(self) -> None:
        self.page.wait_for_function("window.app && app.graph && app.graph.nodes && app.graph.nodes.length > 0",
                                    timeout=60000)

    def failures(self) -> list[tuple[int, str, str]]:
        return [(s, m, p) for s, m, p in self.responses
                if s >= 400 and p.split("?")[0] not in ALLOWED_FAILURES
                and not (s == 404 and p.startswith(NO_PREVIEW_PREFIX))]

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"comfyui-frontend-{name}.png"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def frontend(comfy_browser: Any, comfy_server: ComfyServer) -> Iterator[FrontendPage]:
    fp = FrontendPage(comfy_browser, comfy_server)
    yield fp
    fp.close()
