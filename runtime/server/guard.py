"""The request guard: ASGI middleware that checks Host / Origin / API key / body size / media
type before any endpoint runs, times out stalled bodies, and turns unhandled exceptions into a
JSON 500."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixflow.runtime.server.sse import error_response
from radixflow.runtime.server.tokenizer_manager import APIError

if TYPE_CHECKING:
    from radixflow.runtime.server.args import ServerArgs

logger = logging.getLogger(__name__)

_OPEN_PATHS = ("/health",)
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_STATE_CHANGING_GETS = ("/flush_cache",)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class RequestGuard:
    """ASGI middleware in front of every endpoint. Refuses, with a JSON error:
    a Host not allowed (403, DNS rebinding; see `allowed_hosts`), a state-changing request (any
    POST, GET /flush_cache) from a foreign browser Origin (403, CSRF), a missing API key (401),
    a declared body over `max_request_bytes` (413), a non-empty body that is not
    `application/json` on a non-GET request (415), a body that stalls `body_timeout` s between
    chunks (408, then closes). /health skips the Host, Origin and key checks. An unhandled
    exception becomes a 500 that closes the connection."""

    def __init__(self, app: ASGIApp, args: ServerArgs) -> None:
        self.app = app
        self.api_key = args.api_key
        self.max_bytes = args.max_request_bytes
        self.body_timeout = args.body_timeout
        self.hosts = allowed_hosts(args.host, args.allowed_hosts)
        self.any_origin = "*" in args.allowed_origins
        self.origins = {key for o in args.allowed_origins if (key := _origin_key(o)) is not None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = _timed_receive(receive, self.body_timeout)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            err = self._check(scope, headers)
            if err is None and _chunked_not_json(scope, headers):
                receive, err = await self._peek_body(receive, headers)
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
            await self.app(scope, receive, tracked_send)
        except APIError as e:  # the body timeout, raised from receive() outside an endpoint
            if started:
                raise
            await error_response(e)(scope, receive, send)
        except Exception as e:
            if started:
                raise
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await error_response(APIError(500, f"internal server error: {type(e).__name__}", "server_error",
                                          "internal_error"))(scope, receive, send)

    def _check(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        path, method = scope["path"], scope["method"]
        if path not in _OPEN_PATHS:
            host = headers.get("host")
            if self.hosts is not None and host is not None and _hostname(host) not in self.hosts:
                return APIError(403, f"Host {host!r} is not allowed (see --allowed-hosts)", "permission_error",
                                "host_not_allowed")
            origin = headers.get("origin")
            changes_state = method not in _SAFE_METHODS or path in _STATE_CHANGING_GETS
            if origin is not None and changes_state and not self._origin_ok(origin, scope, host):
                return APIError(403, f"cross-origin request from {origin!r} refused (see --allowed-origins)",
                                "permission_error", "origin_not_allowed")
            if self.api_key is not None:
                auth = headers.get("authorization", "")
                token = auth[7:] if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    return APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                    "authentication_error", "invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return APIError(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        if method not in _SAFE_METHODS and length not in ("", "0") and not _is_json(headers):
            return _unsupported_media_type(headers)
        return None

    def _origin_ok(self, origin: str, scope: Scope, host: str | None) -> bool:
        if self.any_origin:
            return True
        key = _origin_key(origin)
        if key is None:
            return False
        own = _origin_key(f"{scope['scheme']}://{host}") if host is not None else None
        return key == own or key in self.origins

    async def _peek_body(self, receive: Receive, headers: dict[str, str]) -> tuple[Receive, APIError | None]:
        """Read a chunked body of the wrong media type (up to max_bytes): 413 past the limit,
        415 if non-empty; else a receive() that replays what was read."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return receive, APIError(413, f"request body larger than {self.max_bytes} bytes",
                                         code="request_too_large")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if size:
            return receive, _unsupported_media_type(headers)
        return _replay(messages, receive), None


def _unsupported_media_type(headers: dict[str, str]) -> APIError:
    got = headers.get("content-type") or "none"
    return APIError(415, f"request bodies must be application/json (got content-type {got})",
                    code="unsupported_media_type")


def _chunked_not_json(scope: Scope, headers: dict[str, str]) -> bool:
    """A body of unknown length and another media type: refused only if it is not empty."""
    return (scope["method"] not in _SAFE_METHODS and "content-length" not in headers
            and "transfer-encoding" in headers and not _is_json(headers))


def _is_json(headers: dict[str, str]) -> bool:
    return headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def _timed_receive(receive: Receive, timeout: float) -> Receive:
    """`receive` that raises APIError 408 when the request body stalls `timeout` s."""
    body_done = False

    async def timed() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body stalled for more than {timeout:g}s",
                           code="request_timeout") from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


def allowed_hosts(bound: str, extra: tuple[str, ...]) -> frozenset[str] | None:
    """Host names (lowercase, no port or brackets) a server bound to `bound` answers; None =
    any. A loopback server answers its loopback names plus `extra`; another one only `extra`
    when given (`*` in it = any)."""
    if "*" in extra:
        return None
    names = {_hostname(h) for h in extra}
    if _is_loopback(bound):
        return frozenset(names | set(_LOOPBACK_HOSTS) | {_hostname(bound)})
    return frozenset(names) if names else None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _hostname(host: str) -> str:
    """'Example.com:80' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, default ports filled in; None if malformed."""
    try:
        u = urlsplit(origin.strip().lower())
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return None
    if not u.scheme or not u.hostname or port is None:
        return None
    return u.scheme, u.hostname.rstrip("."), port
