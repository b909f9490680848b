"""The router's workers: each one's URL, health, load and approximate cache tree, and the health
checks that take a dead worker out of rotation and put it back once it answers again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx

from radixflow.runtime.router.args import RouterArgs, normalize_worker_url
from radixflow.runtime.router.tree import ApproxTree

logger = logging.getLogger("radixflow.router")


@dataclass
class Worker:
    """One `radixflow serve` behind the router. `in_flight`: requests dispatched to it whose
    answer has not ended; `healthy`: whether it gets traffic; `failed_checks`: failed health
    checks (or failed connections) in a row."""

    url: str
    tree: ApproxTree
    healthy: bool = True
    in_flight: int = 0
    failed_checks: int = 0
    requests: int = 0
    failures: int = 0
    affinity_hits: int = 0

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "in_flight": self.in_flight,
                "requests": self.requests, "failures": self.failures, "affinity_hits": self.affinity_hits,
                "tree_chars": self.tree.size}


@dataclass
class WorkerPool:
    """The workers by URL, in the order they were added. Only the router's event loop touches it."""

    args: RouterArgs
    workers: dict[str, Worker] = field(default_factory=dict)

    def add(self, url: str, healthy: bool = True) -> Worker:
        """Add the worker at `url` (normalized); ValueError if malformed or already present."""
        url = normalize_worker_url(url)
        if url in self.workers:
            raise ValueError(f"worker {url} is already routed to")
        worker = self.workers[url] = Worker(url, ApproxTree(self.args.max_tree_chars), healthy=healthy)
        return worker

    def remove(self, url: str) -> Worker:
        """Remove the worker at `url`; KeyError if there is none."""
        return self.workers.pop(normalize_worker_url(url))

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy]

    def mark_failed(self, worker: Worker, reason: str) -> None:
        """A request could not reach `worker`: out of rotation until a health check passes."""
        worker.failures += 1
        if worker.healthy:
            logger.warning("worker %s is down (%s): no more traffic until /health answers", worker.url, reason)
        self._set_dead(worker)

    def _set_dead(self, worker: Worker) -> None:
        worker.healthy = False
        worker.failed_checks = max(worker.failed_checks, self.args.health_failures)
        worker.tree.clear()  # whatever it held may be gone when it comes back

    async def check(self, client: httpx.AsyncClient, worker: Worker) -> bool:
        """One health check of `worker` (GET /health == 200); updates its state, returns the result."""
        try:
            resp = await client.get(worker.url + "/health", timeout=self.args.health_timeout)
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if self.workers.get(worker.url) is not worker:
            return ok  # removed meanwhile
        if ok:
            if not worker.healthy:
                logger.info("worker %s is healthy again", worker.url)
            worker.healthy, worker.failed_checks = True, 0
        else:
            worker.failed_checks += 1
            if worker.healthy and worker.failed_checks >= self.args.health_failures:
                logger.warning("worker %s failed %d health checks: out of rotation", worker.url,
                               worker.failed_checks)
                self._set_dead(worker)
        return ok

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.check(client, w) for w in list(self.workers.values())))

    async def run_health_checks(self, client: httpx.AsyncClient) -> None:
        """Check every worker each `health_interval` s, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.args.health_interval)
            await self.check_all(client)
