"""The FastAPI app of one server: the request guard (guard.py) in front of the native routes
(native_api.py) and the OpenAI routes (openai_api.py), with one JSON error shape
(`{"error": {"message", "type", "code", "param"}}`, sse.error_response) for every failure."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixflow.runtime.server.guard import RequestGuard
from radixflow.runtime.server.native_api import native_router
from radixflow.runtime.server.openai_api import openai_router
from radixflow.runtime.server.sse import error_response
from radixflow.runtime.server.tokenizer_manager import APIError, TokenizerManager

if TYPE_CHECKING:
    from radixflow.runtime.server.args import ServerArgs

logger = logging.getLogger(__name__)

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


def build_app(tm: TokenizerManager, args: ServerArgs, model_name: str) -> FastAPI:
    """The whole HTTP surface of one server."""
    app = FastAPI(title="radixflow", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, args=args)
    app.include_router(openai_router(tm, args, model_name))
    app.include_router(native_router(tm, args, model_name))

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

    return app
