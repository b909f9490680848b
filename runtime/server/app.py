"""The FastAPI app: SGLang-compatible native endpoints, the OpenAI router, the request guard
(Host / Origin / auth / size / media-type checks, body timeout) and one JSON error shape
(`{"error": {"message", "type", "code", "param"}}`) for every failure."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixflow.runtime.server.tokenizer_manager import APIError, Submission, TokenizerManager, bad_request
from radixflow.runtime.validation import check_json_nesting, check_strings

if TYPE_CHECKING:
    from radixflow.runtime.server.serve import ServerArgs

logger = logging.getLogger(__name__)

_GENERATE_KEYS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                  "top_logprobs_num", "return_text_in_logprobs", "stream"}
_OPEN_PATHS = ("/health",)
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_STATE_CHANGING_GETS = ("/flush_cache",)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf (a grammar-masked token's logprob)
_PREFLIGHT_S = 10.0  # longest wait for a stream's first result before its headers are sent


def error_response(err: APIError) -> JSONResponse:
    """The JSON error response. A 5xx or 408 also closes the connection (`Connection: close`):
    after those the server may not have read the whole request."""
    close = err.status >= 500 or err.status == 408
    return JSONResponse(err.body(), status_code=err.status, headers={"Connection": "close"} if close else None)


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def finite(x: Any) -> Any:
    """`x` with every non-finite float (in nested lists/dicts) replaced by a large negative."""
    if isinstance(x, float):
        return x if math.isfinite(x) else _LOGPROB_FLOOR
    if isinstance(x, list):
        return [finite(v) for v in x]
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return x


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body parsed as JSON. Raises APIError 413 past `max_bytes`, 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        check_json_nesting(raw)  # before json.loads, which recurses once per level
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except ValueError as e:
        raise bad_request(str(e)) from None
    fields = body.items() if isinstance(body, dict) else [("the request body", body)]
    for name, value in fields:
        try:
            check_strings(value, name)
        except ValueError as e:
            raise bad_request(str(e), param=name if isinstance(body, dict) else None) from None
    return body


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request, tm: TokenizerManager, sub: Submission) -> AsyncIterator[None]:
    """While inside: if the client disconnects, abort the submission's unfinished requests
    (freeing their KV slots) and wake whoever waits on it; `sub.disconnected` becomes True."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not all(st.finished for st in sub.states):
            sub.disconnected = True
            tm.close(sub)
            sub.event.set()

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    finally:
        task.cancel()


async def stream_preflight(request: Request, tm: TokenizerManager, sub: Submission) -> Response | None:
    """Before a stream's headers go out, wait (up to _PREFLIGHT_S) for the first result, so that a
    request the scheduler refuses (e.g. a grammar that does not compile) gets a 4xx status
    rather than an error event. Returns the response to send instead of the stream, or None."""
    try:
        async with abort_on_disconnect(request, tm, sub):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sub.event.wait(), _PREFLIGHT_S)  # not cleared: the stream reads it
    except BaseException:
        tm.close(sub)
        raise
    if sub.disconnected:
        return Response(status_code=499)
    err = sub.error()
    if err is not None:
        tm.close(sub)
        return error_response(err)
    return None


class _Guard:
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


def build_app(tm: TokenizerManager, args: ServerArgs, model_name: str) -> FastAPI:
    """The whole HTTP surface of one server."""
    from radixflow.runtime.server.openai_api import openai_router

    app = FastAPI(title="radixflow", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, args=args)
    app.include_router(openai_router(tm, args, model_name))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, msg, _STATUS_TYPES.get(exc.status_code, "error"), code))

    @app.get("/health")
    async def health() -> Response:
        problem = tm.health()
        if problem:
            return error_response(APIError(503, f"unhealthy: {problem}", "server_error", "service_unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """Healthy only if one token makes it through scheduler and detokenizer in time."""
        token = tm.tokenizer.bos_token_id if tm.tokenizer.bos_token_id is not None else 0
        prepared = await tm.prepare([[token]], [{"max_new_tokens": 1, "temperature": 0.0}])
        sub = tm.submit(prepared, bypass_capacity=True)
        try:
            await asyncio.wait_for(tm.wait(sub), args.health_generate_timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"no token generated within {args.health_generate_timeout:.0f}s", "server_error",
                           "service_unavailable") from None
        finally:
            tm.close(sub)
        err = sub.error()
        if err is not None:
            raise APIError(503, err.message, "server_error", "service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        return {"model_path": tm.model_path, "tokenizer_path": tm.tokenizer.path, "is_generation": True,
                "served_model_name": model_name, "context_length": tm.context_length,
                "vocab_size": tm.vocab_size}

    @app.get("/get_chat_template")
    async def get_chat_template() -> dict[str, Any]:
        """The model's chat template and its end-of-turn stop strings (for the DSL's roles)."""
        tok = tm.tokenizer
        return {"chat_template": tok.chat_template, "stop_strings": list(tok.chat_stop_strings),
                **tok.special_tokens}

    @app.get("/get_server_info")
    async def get_server_info() -> dict[str, Any]:
        info = await tm.get_info()
        sargs = dataclasses.asdict(args)
        sargs["api_key"] = "<set>" if args.api_key else None
        return {**info, "in_flight_requests": len(tm.states), "model_path": tm.model_path,
                "served_model_name": model_name, "server_args": sargs}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        ok, message = await tm.flush_cache()
        if not ok:
            raise bad_request(f"cache not flushed: {message}", code="busy")
        return JSONResponse({"success": True, "message": message})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> dict[str, Any]:
        body = await read_json(request, args.max_request_bytes)
        if not isinstance(body, dict) or not isinstance(body.get("rid"), str):
            raise bad_request('expected {"rid": "<request id>"}', param="rid")
        return {"success": tm.abort(body["rid"])}

    @app.get("/metrics")
    async def metrics() -> Response:
        with contextlib.suppress(APIError):
            await tm.get_info(timeout=5.0)  # refreshes the scheduler gauges
        return Response(tm.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await read_json(request, args.max_request_bytes)
        prompts, single, kwargs = _parse_generate(body)
        stream = kwargs.pop("stream")
        prepared = await tm.prepare(prompts, stream=stream, **kwargs)
        sub = tm.submit(prepared)
        many = not single or len(prepared.reqs) > 1
        if stream:
            refused = await stream_preflight(request, tm, sub)
            if refused is not None:
                return refused
            return StreamingResponse(_native_stream(request, tm, sub, many), media_type="text/event-stream")
        try:
            async with abort_on_disconnect(request, tm, sub):
                results = await tm.wait(sub)
        finally:
            tm.close(sub)
        if sub.disconnected:
            return Response(status_code=499)
        err = sub.error()
        if err is not None:
            raise err
        results = [finite(r) for r in results]
        return JSONResponse(results if many else results[0])

    return app


def _parse_generate(body: Any) -> tuple[list, bool, dict[str, Any]]:
    """(prompts, single, keyword arguments for TokenizerManager.prepare) of a /generate body."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - _GENERATE_KEYS)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise bad_request("give exactly one of text and input_ids")
    if text is not None:
        single = isinstance(text, str)
        prompts = [text] if single else text
        if not isinstance(prompts, list) or not all(isinstance(t, str) for t in prompts):
            raise bad_request("text must be a string or a list of strings", param="text")
    else:
        if not isinstance(ids, list):
            raise bad_request("input_ids must be a list of token ids or a list of such lists", param="input_ids")
        single = not ids or not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        if not all(isinstance(p, list) for p in prompts):
            raise bad_request("input_ids must be a list of token ids or a list of such lists", param="input_ids")
    if not prompts:
        raise bad_request("no prompt given")
    sp = body.get("sampling_params")
    sampling = sp if isinstance(sp, list) else [sp] * len(prompts)
    rid = body.get("rid")
    rids = rid if isinstance(rid, list) else [rid] * len(prompts) if len(prompts) == 1 or rid is None else None
    if rids is None:
        raise bad_request("a batch needs a list of rids, one per prompt", param="rid")
    stream = body.get("stream", False)
    flags = {k: body.get(k, d) for k, d in (("return_logprob", False), ("return_text_in_logprobs", False))}
    for k, v in {**flags, "stream": stream}.items():
        if not isinstance(v, bool):
            raise bad_request(f"{k} must be a boolean", param=k)
    kwargs = dict(sampling=sampling, rids=rids, logprob_start_len=body.get("logprob_start_len", -1),
                  top_logprobs_num=body.get("top_logprobs_num", 0), stream=stream, **flags)
    return prompts, single, kwargs


async def _native_stream(request: Request, tm: TokenizerManager, sub: Submission, many: bool) -> AsyncIterator[str]:
    try:
        async with abort_on_disconnect(request, tm, sub):
            async for i, res in tm.results(sub):
                if sub.disconnected:
                    return
                fr = res["meta_info"].get("finish_reason") or {}
                if fr.get("type") == "abort" and not sub.states[i].aborted_by_user:
                    err = sub.error()
                    yield sse(err.body() if err else {"error": {"message": fr.get("message")}})
                    break
                yield sse(finite({**res, "index": i}) if many else finite(res))
            yield SSE_DONE
    finally:
        tm.close(sub)
