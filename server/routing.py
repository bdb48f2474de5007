"""Route tables that register every API route twice (at `path` and at `/api` + `path`, as ComfyUI does)
and remember a short description of each for the OpenAPI document."""
from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, overload

from aiohttp import web

from engine.store import finite_json

from .security import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API_PREFIX = "/api"


@dataclass
class RouteDoc:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    params: list[dict] = field(default_factory=list)     # OpenAPI parameter objects (query/path)
    body: dict | None = None                               # JSON schema of the request body
    body_type: str = "application/json"
    responses: dict[str, str] = field(default_factory=dict)


class Routes:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.docs: list[RouteDoc] = []

    def route(self, method: str, path: str, summary: str, *, params: list[dict] | None = None,
              body: dict | None = None, body_type: str = "application/json",
              responses: dict[str, str] | None = None) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.docs.append(RouteDoc(method, path, fn, summary, self.tag, params or [], body, body_type,
                                      responses or {"200": "OK"}))
            return fn
        return deco

    def get(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, summary, **kw)

    def post(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, summary, **kw)

    def put(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, summary, **kw)

    def delete(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, summary, **kw)

    def add_to(self, app: web.Application) -> None:
        for doc in self.docs:
            for prefix in ("", API_PREFIX):
                app.router.add_route(doc.method, prefix + doc.path, doc.handler)


# ---- request parsing helpers shared by the route modules ---------------------------------------

async def read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it."""
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "request body is empty; expected JSON", type_="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8 text", type_="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:  # JSONDecodeError, and int strings over Python's digit limit
        raise ApiError(400, f"malformed JSON: {e}", type_="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "JSON nested too deeply", type_="invalid_json") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict:
    body = await read_json(request, allow_empty=allow_empty)
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", type_="invalid_json")
    return body


@overload
def query_int(request: web.Request, name: str, default: int, *, minimum: int | None = None,
              maximum: int = 10**9) -> int: ...
@overload
def query_int(request: web.Request, name: str, default: None = None, *, minimum: int | None = None,
              maximum: int = 10**9) -> int | None: ...
def query_int(request: web.Request, name: str, default: int | None = None, *, minimum: int | None = None,
              maximum: int = 10**9) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be an integer, got {raw[:40]!r}") from None
    if minimum is not None and value < minimum:
        raise ApiError(400, f"query parameter {name!r} must be >= {minimum}")
    if abs(value) > maximum:
        raise ApiError(400, f"query parameter {name!r} is out of range")
    return value


def finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, f"{name!r} must be a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ApiError(400, f"{name!r} must be a number") from None
    if not math.isfinite(number) or abs(number) > 2**53:
        raise ApiError(400, f"{name!r} is out of range")
    return number


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    try:
        text = json.dumps(data, allow_nan=False, default=_jsonable)
    except ValueError:  # NaN/inf somewhere in a node's UI output: send null rather than invalid JSON
        text = json.dumps(finite_json(data), allow_nan=False, default=_jsonable)
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def _jsonable(value: Any) -> Any:
    # Paths, sets and the like can turn up in UI dicts; a reply must never fail on them.
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
