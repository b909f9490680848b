"""The FastAPI app of one server: the request guard (guard.py) in front of the native routes
(native_api.py) and the OpenAI routes (openai_api.py), with one JSON error shape
(`{"error": {"message", "type", "code", "param"}}`, sse.error_response) for every failure."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI

from radixflow.runtime.server.guard import RequestGuard
from radixflow.runtime.server.native_api import native_router
from radixflow.runtime.server.openai_api import openai_router
from radixflow.runtime.server.sse import add_error_handlers
from radixflow.runtime.server.tokenizer_manager import TokenizerManager

if TYPE_CHECKING:
    from radixflow.runtime.server.args import ServerArgs

logger = logging.getLogger(__name__)


def build_app(tm: TokenizerManager, args: ServerArgs, model_name: str) -> FastAPI:
    """The whole HTTP surface of one server."""
    app = FastAPI(title="radixflow", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, args=args)
    app.include_router(openai_router(tm, args, model_name))
    app.include_router(native_router(tm, args, model_name))
    add_error_handlers(app, logger)
    return app
