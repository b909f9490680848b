"""The router's FastAPI app: the server's request guard in front of the routed APIs (native and
OpenAI, streaming included), the endpoints answered for the whole fleet (/health,
/get_server_info, /flush_cache, /abort_request, /metrics) and worker management
(/add_worker, /remove_worker, /list_workers). Errors have the server's JSON shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response

from radixflow.runtime.router.fleet import fleet_routes
from radixflow.runtime.router.keys import routing_text
from radixflow.runtime.router.state import RouterState
from radixflow.runtime.server.guard import RequestGuard
from radixflow.runtime.server.sse import add_error_handlers, read_body

logger = logging.getLogger("radixflow.router")

ROUTED_POSTS = ("/generate", "/v1/completions", "/v1/chat/completions")
ANY_WORKER_GETS = ("/v1/models", "/get_model_info", "/get_chat_template", "/health_generate")


def build_router_app(state: RouterState) -> FastAPI:
    """The router's whole HTTP surface."""
    app = FastAPI(title="radixflow router", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, args=state.args.guard_args())
    _routed(app, state)
    fleet_routes(app, state)
    add_error_handlers(app, logger)
    return app


def _routed(app: FastAPI, state: RouterState) -> None:
    max_bytes = state.args.max_request_bytes

    async def routed(request: Request) -> Response:
        body = await read_body(request, max_bytes)
        return await state.forwarder.forward(request, body, routing_text(request.url.path, body))

    async def any_worker(request: Request) -> Response:
        return await state.forwarder.forward(request, b"", "")

    for path in ROUTED_POSTS:
        app.add_api_route(path, routed, methods=["POST"])
    for path in ANY_WORKER_GETS:
        app.add_api_route(path, any_worker, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", any_worker, methods=["GET"])
