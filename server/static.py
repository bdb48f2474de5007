"""The editor: `web/dist/` served at `/` (no `/api` twin). Files are looked up with `contained_path`,
so a symlink or `..` cannot leave the folder. These are the only routes that load without the auth
token: they hold no data, and the page must load before it can send the token."""
from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

from engine.paths import UnsafePathError, contained_path

from .security import json_error

DEFAULT_WEB_ROOT = Path(__file__).resolve().parent.parent / "web" / "dist"

BUILD_HELP = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sdflow: editor not built</title>
<style>body{font-family:system-ui,sans-serif;max-width:44rem;margin:3rem auto;line-height:1.5;padding:0 1rem}
code,pre{background:#f2f2f2;padding:.1rem .3rem;border-radius:4px}</style></head>
<body><h1>sdflow is running, but the editor is not built</h1>
<p>The server found no <code>web/dist/index.html</code>. Build the editor once, then reload this page:</p>
<pre>make run</pre>
<p>(builds the editor and starts the server), or by hand:</p>
<pre>cd web &amp;&amp; npm ci &amp;&amp; npm run build</pre>
<p>The HTTP API works without the editor: see <a href="/api/openapi.json">/api/openapi.json</a>.</p>
</body></html>
"""


def add_static_routes(app: web.Application, web_root: Path | None) -> None:
    root = Path(web_root) if web_root is not None else DEFAULT_WEB_ROOT

    async def index(request: web.Request) -> web.StreamResponse:
        page = root / "index.html"
        if page.is_file():
            return web.FileResponse(page, headers={"Cache-Control": "no-cache",
                                                   "X-Content-Type-Options": "nosniff"})
        return web.Response(text=BUILD_HELP, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        if tail.startswith("api/") or tail == "api":
            return json_error(404, "no such API route", type_="not_found")
        try:
            path = contained_path(root, tail)
        except UnsafePathError:
            return json_error(403, "path refused", type_="forbidden")
        if not path.is_file():
            return json_error(404, "not found", type_="not_found")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        cache = "no-cache" if path.suffix in (".html", ".js", ".css", ".json") else "public, max-age=86400"
        return web.FileResponse(path, headers={"Content-Type": mime, "Cache-Control": cache,
                                               "X-Content-Type-Options": "nosniff"})

    index.sdflow_public = True  # type: ignore[attr-defined]
    asset.sdflow_public = True  # type: ignore[attr-defined]
    app.router.add_get("/", index)
    app.router.add_get("/{tail:.+}", asset)


def is_public(request: web.Request) -> bool:
    if request.method not in ("GET", "HEAD"):
        return False
    return bool(getattr(request.match_info.handler, "sdflow_public", False))
