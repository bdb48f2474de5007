"""Middlewares that keep a local server safe from the browser it runs next to.

- `error_middleware`: any unexpected exception becomes a 500 JSON reply; the server keeps serving.
- `host_origin_middleware`: refuses state-changing requests (and websocket upgrades) coming from another
  site: a foreign `Origin`, `Origin: null` (sandboxed iframes), or `Sec-Fetch-Site: cross-site`. When the
  server listens on loopback it also refuses a `Host` that is not a loopback name, which is what a DNS
  rebinding attack sends. Proxies are allowed through `allowed_origins`.
- `auth_middleware`: an optional bearer token, on every route including the websocket; only the static
  editor files load without it (they hold no data and must load before the page can send the token).
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("sdflow.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATE_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})


def json_error(status: int, message: str, *, type_: str = "bad_request", details: str = "",
               headers: dict | None = None) -> web.Response:
    """Every refusal the server makes has the same JSON shape as ComfyUI's top-level prompt error."""
    body = {"error": {"type": type_, "message": message, "details": details, "extra_info": {}}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


class ApiError(Exception):
    """Raised by handlers for a clean 4xx with a message."""

    def __init__(self, status: int, message: str, *, type_: str = "bad_request", details: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.type_, self.details = status, message, type_, details


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return json_error(e.status, e.message, type_=e.type_, details=e.details)
    except web.HTTPException as e:
        text = e.text or ""
        if e.status >= 400 and e.content_type != "application/json" and not text.startswith("{"):
            # aiohttp's own 4xx (404, 405, 413) as JSON so API clients get one format
            return json_error(e.status, e.reason, type_=_http_type(e.status), details=text[:300],
                              headers={k: v for k, v in e.headers.items()
                                       if k.lower() in ("allow", "www-authenticate")})
        raise
    except ConnectionResetError:  # the client went away; nothing to answer
        raise
    except HttpProcessingError as e:  # malformed body parts found while reading
        status = e.code if 400 <= (e.code or 0) < 500 else 400
        return json_error(status, f"malformed request: {e.message}"[:300])
    except UnicodeError:   # a lone surrogate or undecodable byte that reached an encoder (SQLite, a file name)
        log.info("refused %s %s: text that is not valid UTF-8", request.method, request.path, exc_info=True)
        return json_error(400, "the request contains text that is not valid UTF-8 (e.g. a lone surrogate)")
    except OSError as e:   # a file name the file system refuses; the reply never names the server's paths
        os_status = _OS_STATUS.get(e.errno or 0)
        if os_status is None:
            log.exception("file system error on %s %s", request.method, request.path)
            return json_error(500, f"internal error: {e.strerror or type(e).__name__}", type_="internal_error")
        log.info("refused %s %s: %s", request.method, request.path, e)
        return json_error(os_status, f"the path is not usable here: {e.strerror}", type_=_http_type(os_status))
    except RecursionError:
        return json_error(400, "the request is nested too deeply")
    except Exception as e:  # the one place an unexpected bug is turned into a reply
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, f"internal error: {type(e).__name__}", type_="internal_error",
                          details=scrub_paths(str(e))[:500])


_OS_STATUS = {errno.ENAMETOOLONG: 400, errno.EEXIST: 409, errno.ENOTDIR: 400, errno.EISDIR: 400,
              errno.ENOENT: 404, errno.EINVAL: 400, errno.EILSEQ: 400}
_ABS_PATH = re.compile(r"""(?<![\w:/])(?:/[^\s'"/:]+)+/?|[A-Za-z]:\\[^\s'"]+""")


def scrub_paths(text: str) -> str:
    """`text` with absolute file paths replaced by their last component: error texts that reach clients
    must not show where the server keeps its files."""
    return _ABS_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], text)


def _http_type(status: int) -> str:
    return {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "payload_too_large"}.get(status, "bad_request")


# ---- host / origin --------------------------------------------------------------------------------

def _split_host(value: str) -> tuple[str, int | None]:
    """'Host: name:port' / '[::1]:8188' -> (name, port)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, ""
    return name, (int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else None)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    """'https://Host:port' -> (scheme, host, effective port), or None when it is not an origin."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query or parts.username:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _shown(text: str) -> str:
    """A header value as quoted in an error: printable and short."""
    return repr(text[:100])


def _is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_bind(host: str) -> bool:
    return _is_loopback_name(host.strip("[]").lower())


@dataclass
class OriginPolicy:
    """`allowed_origins`: full origins ("https://sd.example.com") a reverse proxy or another front end
    uses; "*" turns the origin checks off (not recommended)."""

    allowed_origins: Iterable[str] = ()
    loopback_only: bool = True
    _allowed: set[str] = field(default_factory=set, init=False)
    _allowed_hosts: set[str] = field(default_factory=set, init=False)
    _allowed_triples: set[tuple] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        for origin in self.allowed_origins:
            origin = origin.strip().rstrip("/").lower()
            if not origin:
                continue
            self._allowed.add(origin)
            netloc = urlsplit(origin).netloc if "://" in origin else origin
            if netloc:
                self._allowed_hosts.add(_split_host(netloc)[0])
            parsed = _parse_origin(origin)
            if parsed is not None:
                self._allowed_triples.add(parsed)

    @property
    def allow_all(self) -> bool:
        return "*" in self._allowed

    def check(self, request: web.Request) -> str | None:
        """The reason to refuse this request, or None."""
        if self.allow_all:
            return None
        host = request.headers.get("Host", "")
        host_name, host_port = _split_host(host) if host else ("", None)
        if self.loopback_only and host and not _is_loopback_name(host_name) and host_name not in self._allowed_hosts:
            return f"Host {_shown(host)} is not allowed on a loopback server (DNS rebinding protection)"
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if request.method not in STATE_CHANGING and not is_ws:
            return None
        origin = request.headers.get("Origin")
        if origin is not None:
            o = origin.strip().rstrip("/").lower()
            if o == "null":
                return "requests with 'Origin: null' are refused"
            if o in self._allowed:
                return None
            parsed = _parse_origin(o)
            if parsed is None:
                return f"malformed Origin {_shown(origin)}"
            if parsed in self._allowed_triples:
                return None
            # Same origin means the same scheme, host and effective port: a page on http://127.0.0.1 (port
            # 80) or https://127.0.0.1:8188 is another site, even though the host name matches.
            own = (request.scheme.lower(), host_name, host_port or _DEFAULT_PORTS.get(request.scheme.lower()))
            if not host or parsed != own:
                return (f"cross-origin request refused: Origin {_shown(origin)} is not this server "
                        f"({own[0]}://{_shown(host)})")
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            return "cross-site request refused (Sec-Fetch-Site: cross-site)"
        return None


def host_origin_middleware(policy: OriginPolicy):
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = policy.check(request)
        if reason is not None:
            log.warning("refused %s %s: %s", request.method, request.path, reason)
            return json_error(403, reason, type_="forbidden")
        return await handler(request)

    return middleware


# ---- bearer token ---------------------------------------------------------------------------------

def request_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query.get("token")


def auth_middleware(token: str | None, is_public: Callable[[web.Request], bool]):
    """`is_public(request)` says which requests (the static editor files) need no token."""
    expected = token.encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.method == "OPTIONS" or is_public(request):
            return await handler(request)
        given = request_token(request)
        try:
            given_bytes = given.encode("utf-8", "surrogateescape") if given is not None else None
        except UnicodeEncodeError:   # a lone surrogate: certainly not the token
            given_bytes = None
        if given_bytes is None or not hmac.compare_digest(given_bytes, expected):
            return json_error(401, "missing or wrong auth token (send 'Authorization: Bearer <token>' "
                                   "or '?token=<token>')", type_="unauthorized",
                              headers={"WWW-Authenticate": 'Bearer realm="sdflow"'})
        return await handler(request)

    return middleware
