"""What the native and OpenAI APIs share: the JSON error response, server-sent events, JSON
request bodies (`read_json`), and a submission's life while its client is connected
(`abort_on_disconnect`, `stream_preflight`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixflow.runtime.server.tokenizer_manager import APIError, Submission, TokenizerManager, bad_request
from radixflow.runtime.validation import check_json_nesting, check_strings

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf (a grammar-masked token's logprob)
_PREFLIGHT_S = 10.0  # longest wait for a stream's first result before its headers are sent


def add_error_handlers(app: FastAPI, log: logging.Logger) -> None:
    """Answer every failure of `app` with `error_response`: an APIError as it is (a 5xx logged as
    a warning on `log`), and Starlette's own (an unknown path, a wrong method) in the same shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, msg, _STATUS_TYPES.get(exc.status_code, "error"), code))


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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw request body. Raises APIError 413 past `max_bytes`: at once when Content-Length
    says so, else as soon as the streamed body passes it (chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body larger than {max_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body parsed as JSON. Raises APIError 413 past `max_bytes`, 400 if not JSON."""
    raw = await read_body(request, max_bytes)
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
