"""`radixflow serve`: the HTTP process (FastAPI on uvloop + TokenizerManager) with a scheduler
process and a detokenizer process (see launch.py for the sockets).

`launch_server(args)` binds the port first (fail fast), starts the children, serves until
SIGINT/SIGTERM (returns 0) or until a child dies (then /health answers 503 for a moment and it
returns 1), and always stops the children before returning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from radixflow.runtime.server.args import ServerArgs
from radixflow.runtime.server.launch import ChildProcesses, IpcAddresses, abstract_ipc_supported

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("radixflow.server")

_DEATH_GRACE_S = 2.0  # how long /health reports 503 before the server exits after a child died


class _Interrupted(Exception):
    pass


def launch_server(args: ServerArgs) -> int:
    """Serve until stopped; returns the process exit code. Prints exactly one line to stdout,
    `radixflow server ready on http://HOST:PORT`, once requests can be served."""
    from radixflow.runtime.loading.default_model import resolve_model_path
    from radixflow.runtime.server.detokenizer_process import run_detokenizer_process
    from radixflow.runtime.server.scheduler_process import run_scheduler_process
    from radixflow.runtime.text.tokenizer import Tokenizer

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(processName)s %(levelname)s %(message)s")
    signals: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    # OpenMP threads that spin after each op starve the other two processes on small machines
    # (measured: 5-10x slower requests on 2 busy cores); children inherit this before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    children = ChildProcesses()
    ipc_dir = None if abstract_ipc_supported() else tempfile.mkdtemp(prefix="radixflow-ipc-")
    sock = None
    try:
        sock = bind_listen_socket(args.host, args.port)
        model_path = resolve_model_path(args.engine.model)
        tokenizer_path = args.engine.tokenizer or model_path
        addrs = IpcAddresses.abstract() if ipc_dir is None else IpcAddresses.in_dir(ipc_dir)
        children.spawn("scheduler", run_scheduler_process, args.engine, model_path, addrs.scheduler,
                       addrs.detokenizer, args.log_interval, args.log_level)
        children.spawn("detokenizer", run_detokenizer_process, tokenizer_path, addrs.detokenizer,
                       addrs.tokenizer, args.log_level)
        tokenizer = Tokenizer.from_pretrained(tokenizer_path)
        infos = children.wait_ready(args.startup_timeout)
        for sig in (signal.SIGINT, signal.SIGTERM):  # from now on: record, and shut down in order
            signal.signal(sig, lambda signum, frame: signals.append(signum))
        serving = _serve(args, model_path, tokenizer, addrs, infos["scheduler"], children, sock, signals)
        return run_until_stopped(serving)
    except _Interrupted:
        return 0
    except (RuntimeError, OSError, ValueError) as e:
        logger.error("%s", e)
        return 1
    finally:
        children.stop()
        if sock is not None:
            sock.close()
        if ipc_dir is not None:
            shutil.rmtree(ipc_dir, ignore_errors=True)


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, inheritable; OSError naming the address if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_until_stopped(coro) -> int:
    """Run the server coroutine on uvloop (asyncio where uvloop is missing); its exit code."""
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _serve(args: ServerArgs, model_path: str, tokenizer, addrs: IpcAddresses, sched_info: dict,
                 children: ChildProcesses, sock: socket.socket, signals: list[int]) -> int:
    from radixflow.runtime.server.app import build_app
    from radixflow.runtime.server.tokenizer_manager import TokenizerManager

    tm = TokenizerManager(args, model_path, tokenizer, addrs, sched_info)
    tm.start()
    name = args.served_model_name or os.path.basename(os.path.normpath(model_path))
    app = build_app(tm, args, name)
    server = uvicorn_server(app, args.log_level, args.header_timeout)
    exit_code = 0

    async def watchdog() -> None:
        nonlocal exit_code
        await announce_ready(server, sock, "radixflow server ready on")
        while not server.should_exit:
            if signals:
                server.should_exit = True
                break
            dead = children.dead()
            if dead is None and tm.receiver is not None and tm.receiver.done():
                dead = "the tokenizer manager's receive loop"
                if not tm.receiver.cancelled() and tm.receiver.exception() is not None:
                    logger.error("receive loop failed", exc_info=tm.receiver.exception())
            if dead is not None:
                logger.error("%s died: the server is unhealthy and exits", dead)
                tm.unhealthy = f"{dead} died"
                tm.fail_all(f"the server failed: {dead} died")
                exit_code = 1
                await asyncio.sleep(_DEATH_GRACE_S)
                server.should_exit = True
                break
            await asyncio.sleep(0.1)
        tm.unhealthy = tm.unhealthy or "the server is shutting down"
        tm.fail_all("the server is shutting down")

    task = asyncio.get_running_loop().create_task(watchdog())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()
        await tm.shutdown()
    return exit_code


def uvicorn_server(app: Any, log_level: str, header_timeout: float) -> uvicorn.Server:
    """The uvicorn server of an HTTP process (a server's or the router's): no access log and no
    lifespan events, 3 s of graceful shutdown, 30 s keep-alive, `header_timeout` for request
    headers; uvicorn's own loggers at `log_level` but never below WARNING (per-request noise)."""
    import uvicorn

    for lg in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(lg).setLevel(max(logging.WARNING, logging.getLevelName(log_level.upper())))
    return uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=3, timeout_keep_alive=30,
                                         http=header_timeout_protocol(header_timeout)))


async def announce_ready(server: uvicorn.Server, sock: socket.socket, prefix: str) -> bool:
    """Wait until `server` listens on `sock` (or is told to exit first); then print the ready
    line `{prefix} http://HOST:PORT` to stdout, which launchers wait for. Whether it started."""
    while not server.started and not server.should_exit:
        await asyncio.sleep(0.02)
    if server.started:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host  # an IPv6 literal in a URL
        print(f"{prefix} http://{shown}:{port}", flush=True)
    return server.started


def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol, except that a client that has not sent complete request headers
    `timeout` s after connecting (or after the first byte of its next request on a kept-alive
    connection) is disconnected. uvicorn itself only times out idle kept-alive connections, so
    slow senders (slowloris) would hold a connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # waiting for the next request's headers (or an unread body's end)
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # headers complete: the app runs (body timeouts are the app's)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.debug("closing a connection that sent no complete request in %.0fs", timeout)
                self.transport.close()

    return HeaderTimeoutProtocol
