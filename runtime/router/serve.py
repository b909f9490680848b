"""`run_router(args)`: the router process. Binds its port first (fail fast), checks every worker
once, prints one ready line, then serves (health checks every `health_interval` s) until
SIGINT/SIGTERM (returns 0) or until `watch()` names a reason to stop (returns 1)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable

import httpx

from radixflow.runtime.router.app import build_router_app
from radixflow.runtime.router.args import RouterArgs
from radixflow.runtime.router.metrics import RouterMetrics
from radixflow.runtime.router.policy import make_policy
from radixflow.runtime.router.proxy import Forwarder
from radixflow.runtime.router.state import RouterState
from radixflow.runtime.router.workers import WorkerPool
from radixflow.runtime.server.serve import announce_ready, bind_listen_socket, run_until_stopped, uvicorn_server

logger = logging.getLogger("radixflow.router")

ROUTER_READY = "radixflow router ready on"


def run_router(args: RouterArgs, ready_prefix: str = ROUTER_READY,
               watch: Callable[[], str | None] | None = None) -> int:
    """Serve until stopped; returns the exit code. Prints `{ready_prefix} http://HOST:PORT` to
    stdout once requests can be served."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s router %(levelname)s %(message)s")
    try:
        sock = bind_listen_socket(args.host, args.port)
    except OSError as e:
        logger.error("%s", e)
        return 1
    signals: list[int] = []  # uvicorn re-raises the signal it stopped on: recorded here, not fatal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    try:
        return run_until_stopped(_serve(args, sock, ready_prefix, lambda: "a stop signal" if signals else None, watch))
    finally:
        sock.close()


async def _serve(args: RouterArgs, sock: socket.socket, ready_prefix: str, stopped: Callable[[], str | None],
                 watch: Callable[[], str | None] | None) -> int:
    timeout = httpx.Timeout(args.request_timeout, connect=args.health_timeout)
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        pool = WorkerPool(args)
        for url in args.worker_urls:
            pool.add(url, healthy=False)
        await pool.check_all(client)
        policy = make_policy(args)
        state = RouterState(args, pool, policy, Forwarder(args, pool, policy, client), RouterMetrics(pool), client)
        server = uvicorn_server(build_router_app(state), args.log_level, args.header_timeout)
        exit_code = 0

        async def supervise() -> None:
            nonlocal exit_code
            await announce_ready(server, sock, ready_prefix)
            while not server.should_exit:
                if stopped() is not None:
                    server.should_exit = True
                    break
                reason = watch() if watch is not None else None
                if reason is not None:
                    logger.error("%s: the router exits", reason)
                    exit_code, server.should_exit = 1, True
                await asyncio.sleep(0.2)

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(supervise()), loop.create_task(pool.run_health_checks(client))]
        try:
            await server.serve(sockets=[sock])
        finally:
            for t in tasks:
                t.cancel()
    return exit_code
