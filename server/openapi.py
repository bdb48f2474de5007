"""An OpenAPI 3.1 document built from the route tables (sdflow's own description of its HTTP API)."""
from __future__ import annotations

import re
from collections.abc import Iterable

from .routing import API_PREFIX, RouteDoc, Routes


def build_openapi(tables: Iterable[Routes], version: str) -> dict:
    paths: dict[str, dict] = {}
    for table in tables:
        for doc in table.docs:
            paths.setdefault(doc.path, {})[doc.method.lower()] = _operation(doc)
    paths.setdefault("/ws", {})["get"] = {
        "tags": ["websocket"], "summary": "WebSocket: ?clientId=<id>; JSON events and binary preview frames",
        "parameters": [{"name": "clientId", "in": "query", "schema": {"type": "string"}}],
        "responses": {"101": {"description": "Switching protocols"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sdflow", "version": version,
                 "description": "ComfyUI-compatible HTTP API of sdflow. Every path is also served under "
                                f"'{API_PREFIX}'. When the server runs with an auth token, send "
                                "'Authorization: Bearer <token>' or '?token=<token>'."},
        "servers": [{"url": "/"}, {"url": API_PREFIX}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


def _operation(doc: RouteDoc) -> dict:
    params = list(doc.params)
    for name in re.findall(r"{(\w+)}", doc.path):
        params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    op: dict = {"tags": [doc.tag], "summary": doc.summary,
                "operationId": f"{doc.method.lower()}_{doc.handler.__name__}",
                "responses": {code: {"description": text} for code, text in doc.responses.items()}}
    if params:
        op["parameters"] = params
    if doc.body is not None:
        op["requestBody"] = {"content": {doc.body_type: {"schema": doc.body}}}
    return op
