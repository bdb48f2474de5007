"""ComfyUI's official web front end (PyPI `comfyui-frontend-package`, extra `sdflow[comfyui-frontend]`),
served instead of sdflow's editor by `sdflow serve --frontend comfyui`. It is found in the installed
package, never vendored."""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "comfyui_frontend_package"
INSTALL_HINT = ("ComfyUI's front end is not installed; install it with `pip install 'sdflow[comfyui-frontend]'` "
                "(the PyPI package comfyui-frontend-package)")


class FrontendMissing(RuntimeError):
    pass


def comfyui_web_root() -> Path:
    """The package's static folder (holding index.html), or FrontendMissing with the install hint."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FrontendMissing(INSTALL_HINT)
    for location in spec.submodule_search_locations:
        static = Path(location) / "static"
        if (static / "index.html").is_file():
            return static
    raise FrontendMissing(f"{PACKAGE} is installed but has no static/index.html; reinstall it. " + INSTALL_HINT)


def comfyui_frontend_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        return None
