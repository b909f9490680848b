"""What the router's routes share: `RouterState` and sending one request to every healthy worker
(`fan_out`). Bodies are read by the server's `sse.read_body`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request

from radixflow.runtime.router.args import RouterArgs
from radixflow.runtime.router.metrics import RouterMetrics
from radixflow.runtime.router.policy import Policy
from radixflow.runtime.router.proxy import Forwarder
from radixflow.runtime.router.workers import WorkerPool


@dataclass
class RouterState:
    """Everything the routes share: options, workers, policy, forwarder, metrics, HTTP client."""

    args: RouterArgs
    pool: WorkerPool
    policy: Policy
    forwarder: Forwarder
    metrics: RouterMetrics
    client: httpx.AsyncClient



async def fan_out(state: RouterState, request: Request, method: str, path: str,
                  body: bytes = b"") -> dict[str, httpx.Response | str]:
    """`method path` sent to every healthy worker at once (with the client's Authorization):
    URL -> the worker's response, or a string saying why there is none."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
    workers = state.pool.healthy()

    async def one(url: str) -> httpx.Response | str:
        try:
            return await state.client.request(method, url + path, headers=headers, content=body or None,
                                              timeout=state.args.health_timeout * 6)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"

    answers = await asyncio.gather(*(one(w.url) for w in workers))
    return dict(zip([w.url for w in workers], answers))


def json_of(resp: httpx.Response | str) -> Any:
    """The JSON body of a worker's answer, or {"error": reason} when there is none."""
    if isinstance(resp, str):
        return {"error": resp}
    try:
        return resp.json()
    except ValueError:
        return {"error": f"HTTP {resp.status_code}: not JSON"}
