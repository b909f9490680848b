"""Endpoints the router answers for the whole fleet: /health, /get_server_info, /flush_cache,
/abort_request, /metrics, and worker management: POST /add_worker?url=URL,
POST /remove_worker?url=URL, GET /list_workers."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from radixflow.runtime.router.state import RouterState, fan_out, json_of
from radixflow.runtime.server.request_state import APIError, bad_request
from radixflow.runtime.server.sse import read_body

_SUMMED = ("num_running", "num_waiting", "pool_size", "free_slots", "evictable_slots", "in_flight_requests",
           "prompt_tokens", "computed_prompt_tokens", "cached_tokens")


def fleet_routes(app: FastAPI, state: RouterState) -> None:
    _health_and_info(app, state)
    _cache_and_abort(app, state)
    _management(app, state)


def _health_and_info(app: FastAPI, state: RouterState) -> None:
    pool = state.pool

    @app.get("/health")
    async def health() -> Response:
        healthy = len(pool.healthy())
        if not healthy:
            raise APIError(503, f"unhealthy: none of {len(pool.workers)} workers is healthy", "server_error",
                           "service_unavailable")
        return JSONResponse({"status": "ok", "healthy_workers": healthy, "workers": len(pool.workers)})

    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> dict[str, Any]:
        """Per worker: the router's view and the worker's own /get_server_info; plus the sums."""
        answers = await fan_out(state, request, "GET", "/get_server_info")
        infos = {url: json_of(a) for url, a in answers.items()}
        ok = [i for i in infos.values() if "error" not in i]
        sums = {k: sum(i.get(k, 0) for i in ok) for k in _SUMMED}
        queried = sum(i.get("cache", {}).get("queried_tokens", 0) for i in ok)
        hit = sum(i.get("cache", {}).get("hit_tokens", 0) for i in ok)
        return {**sums, "cache": {"queried_tokens": queried, "hit_tokens": hit,
                                  "hit_rate": hit / queried if queried else 0.0},
                "policy": state.args.policy, "workers": [w.describe() for w in pool.workers.values()],
                "worker_info": infos}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _cache_and_abort(app: FastAPI, state: RouterState) -> None:
    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request) -> Response:
        """Flushed on every healthy worker (their trees cleared), or the first refusal."""
        answers = await fan_out(state, request, "POST", "/flush_cache")
        for url, a in answers.items():
            if isinstance(a, httpx.Response) and a.status_code == 200:
                state.pool.workers[url].tree.clear()
        failed = _first_failure(answers)
        if failed is not None:
            return failed
        return JSONResponse({"success": True, "message": f"flushed {len(answers)} workers"})

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        """Sent to every healthy worker; success if one of them knew the request."""
        body = await read_body(request, state.args.max_request_bytes)
        answers = await fan_out(state, request, "POST", "/abort_request", body)
        oks = [json_of(a) for a in answers.values() if isinstance(a, httpx.Response) and a.status_code == 200]
        if not oks:
            failed = _first_failure(answers)
            if failed is not None:
                return failed
        return JSONResponse({"success": any(o.get("success") is True for o in oks)})


def _first_failure(answers: dict[str, httpx.Response | str]) -> Response | None:
    """The first worker answer that is not a 200, passed on as is (503 if it never answered)."""
    if not answers:
        return JSONResponse(APIError(503, "no healthy worker", "server_error", "no_worker").body(), 503)
    for url, a in answers.items():
        if isinstance(a, str):
            err = APIError(502, f"worker {url} did not answer: {a}", "server_error", "upstream_failed")
            return JSONResponse(err.body(), 502)
        if a.status_code != 200:
            return Response(a.content, a.status_code, media_type=a.headers.get("content-type"))
    return None


def _management(app: FastAPI, state: RouterState) -> None:
    pool = state.pool

    def url_param(request: Request) -> str:
        url = request.query_params.get("url")
        if not url:
            raise bad_request("give the worker as ?url=http://HOST:PORT", code="missing_url", param="url")
        return url

    @app.post("/add_worker")
    async def add_worker(request: Request) -> dict[str, Any]:
        """Adds the worker (out of rotation until its first health check, run now, passes)."""
        try:
            worker = pool.add(url_param(request), healthy=False)
        except ValueError as e:
            code = "worker_exists" if "already" in str(e) else "bad_url"
            raise bad_request(str(e), code=code, param="url") from None
        healthy = await pool.check(state.client, worker)
        return {"success": True, "url": worker.url, "healthy": healthy}

    @app.post("/remove_worker")
    async def remove_worker(request: Request) -> dict[str, Any]:
        """Removes the worker; requests already sent to it finish there."""
        url = url_param(request)
        try:
            worker = pool.remove(url)
        except ValueError as e:
            raise bad_request(str(e), code="bad_url", param="url") from None
        except KeyError:
            raise APIError(404, f"no worker {url} behind this router", "invalid_request_error",
                           "worker_not_found", "url") from None
        return {"success": True, "url": worker.url}

    @app.get("/list_workers")
    async def list_workers() -> dict[str, Any]:
        return {"workers": [w.describe() for w in pool.workers.values()]}
