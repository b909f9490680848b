"""Forwarding one request to a worker chosen by the policy, with retries.

Rule: an attempt that fails before any byte of its answer was forwarded to the client (the
connection fails, the worker answers 5xx, or dies before its first body chunk) is tried again on
another healthy worker, up to `max_attempts` workers; once a byte went out, never. A
non-streamed answer is read whole before it is forwarded (so any failure is retried); a
server-sent event stream is forwarded chunk by chunk as the worker sends it, after its first
chunk arrived. Every answer carries `X-Radixflow-Worker: URL`, the worker that served it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from radixflow.runtime.router.args import RouterArgs
from radixflow.runtime.router.policy import Policy
from radixflow.runtime.router.workers import Worker, WorkerPool
from radixflow.runtime.server.request_state import APIError

logger = logging.getLogger("radixflow.router")

_FORWARDED_HEADERS = ("authorization", "content-type", "accept")
WORKER_HEADER = "X-Radixflow-Worker"


class _AttemptFailed(Exception):
    """An attempt that may be retried elsewhere; `answer` is the worker's own 5xx, if any."""

    def __init__(self, reason: str, answer: Response | None = None) -> None:
        super().__init__(reason)
        self.answer = answer


@dataclass
class _Upstream:
    """One dispatched attempt: releases the worker's in-flight count exactly once."""

    worker: Worker
    resp: httpx.Response | None = None
    released: bool = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            self.worker.in_flight -= 1
        if self.resp is not None:
            await self.resp.aclose()


class Forwarder:
    """Sends requests to the pool's workers (see the module docstring for the retry rule)."""

    def __init__(self, args: RouterArgs, pool: WorkerPool, policy: Policy, client: httpx.AsyncClient) -> None:
        self.args, self.pool, self.policy, self.client = args, pool, policy, client

    async def forward(self, request: Request, body: bytes, text: str) -> Response:
        """The answer of a worker to `request` (method, path, query, `body`), routed by `text`."""
        tried: set[str] = set()
        last: _AttemptFailed | None = None
        for _ in range(self.args.max_attempts):
            candidates = [w for w in self.pool.healthy() if w.url not in tried]
            if not candidates:
                break
            choice = self.policy.choose(text, candidates)
            worker = choice.worker
            tried.add(worker.url)
            self.policy.record(text, worker)
            worker.requests += 1
            worker.affinity_hits += choice.affinity
            try:
                return await self._attempt(worker, request, body)
            except _AttemptFailed as e:
                logger.warning("%s %s on %s failed (%s)%s", request.method, request.url.path, worker.url, e,
                               "; retrying elsewhere" if len(tried) < self.args.max_attempts else "")
                last = e
        if last is not None and last.answer is not None:
            return last.answer
        reason = f" (last: {last})" if last is not None else ""
        raise APIError(503, f"no healthy worker could serve the request{reason}", "server_error", "no_worker")

    async def _attempt(self, worker: Worker, request: Request, body: bytes) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        up = _Upstream(worker)
        worker.in_flight += 1
        streaming = False
        try:
            req = self.client.build_request(request.method, worker.url + request.url.path,
                                            params=request.query_params, headers=headers, content=body)
            up.resp = resp = await self._send(worker, req)
            ctype = resp.headers.get("content-type", "")
            if resp.status_code >= 500:
                content = await self._read_all(worker, resp)
                worker.failures += 1
                answer = Response(content, resp.status_code, media_type=ctype or None,
                                  headers={WORKER_HEADER: worker.url})
                raise _AttemptFailed(f"HTTP {resp.status_code}", answer)
            if not ctype.startswith("text/event-stream"):
                content = await self._read_all(worker, resp)
                return Response(content, resp.status_code, media_type=ctype or None,
                                headers={WORKER_HEADER: worker.url})
            chunks = resp.aiter_raw()
            first = await self._first_chunk(worker, chunks)
            streaming = True
        finally:
            if not streaming:
                await up.release()
        return StreamingResponse(_relay(first, chunks, up), resp.status_code, media_type=ctype,
                                 headers={WORKER_HEADER: worker.url}, background=BackgroundTask(up.release))

    async def _send(self, worker: Worker, req: httpx.Request) -> httpx.Response:
        try:
            return await self.client.send(req, stream=True)
        except httpx.TimeoutException as e:
            if isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout):
                self.pool.mark_failed(worker, f"connect timeout: {e}")
                raise _AttemptFailed(f"connect timeout: {e}") from None
            raise APIError(504, f"worker {worker.url} did not answer within {self.args.request_timeout:g}s",
                           "server_error", "upstream_timeout") from None
        except httpx.HTTPError as e:
            self.pool.mark_failed(worker, f"{type(e).__name__}: {e}")
            raise _AttemptFailed(f"{type(e).__name__}: {e}") from None

    async def _read_all(self, worker: Worker, resp: httpx.Response) -> bytes:
        try:
            return await resp.aread()
        except httpx.HTTPError as e:
            self.pool.mark_failed(worker, f"answer cut: {type(e).__name__}: {e}")
            raise _AttemptFailed(f"answer cut: {type(e).__name__}: {e}") from None

    async def _first_chunk(self, worker: Worker, chunks: AsyncIterator[bytes]) -> bytes:
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:
            return b""
        except httpx.HTTPError as e:
            self.pool.mark_failed(worker, f"stream cut before its first chunk: {type(e).__name__}: {e}")
            raise _AttemptFailed(f"stream cut before its first chunk: {type(e).__name__}") from None


async def _relay(first: bytes, chunks: AsyncIterator[bytes], up: _Upstream) -> AsyncIterator[bytes]:
    """The stream's chunks as they come; if the worker fails mid-stream, one SSE error event."""
    try:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk
    except httpx.HTTPError as e:
        up.worker.failures += 1
        logger.warning("stream from %s cut after its first chunk: %s", up.worker.url, e)
        err = APIError(502, f"the worker {up.worker.url} failed mid-stream: {type(e).__name__}", "server_error",
                       "upstream_failed")
        yield f"data: {json.dumps(err.body())}\n\n".encode()
    finally:
        await up.release()

