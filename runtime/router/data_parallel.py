"""`radixflow serve --dp-size N`: N `radixflow serve` workers on free loopback ports, and a router
in front of them on the requested host and port.

All of them live and die together: the workers are started with PR_SET_PDEATHSIG (on Linux), so
they get SIGTERM when this process dies, however it dies; when one worker exits, the router
exits (code 1) and stops the others; on SIGINT/SIGTERM the router stops and so do the workers.
The ready line is the server's (`radixflow server ready on URL`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from radixflow.runtime.child_process import die_with_parent, preload
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.router.args import RouterArgs
from radixflow.runtime.server.args import ServerArgs

_READY = "radixflow server ready on "
_NOT_PASSED = {"engine", "host", "port", "api_key"}


def worker_argv(args: ServerArgs) -> list[str]:
    """`radixflow serve` options that give a worker `args` (host 127.0.0.1, any free port; the API
    key travels in the environment, not on the command line)."""
    argv = ["serve", "--host", "127.0.0.1", "--port", "0"]
    pairs = [(f, getattr(args, f.name)) for f in dataclasses.fields(ServerArgs) if f.name not in _NOT_PASSED]
    pairs += [(f, getattr(args.engine, f.name)) for f in dataclasses.fields(EngineConfig)]
    for f, value in pairs:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if value == default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            argv += [flag, ",".join(value)]
        else:
            argv += [flag, str(value)]
    return argv


class _Worker:
    """One worker subprocess; `url` once its ready line was read."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "radixflow.runtime.server.cli", *argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=_die_with_parent(os.getpid()))
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.url is None and line.startswith(_READY):
                self.url = line[len(_READY):].strip()
                self._ready.set()
        self._ready.set()

    def wait_ready(self, deadline: float) -> str:
        while not self._ready.wait(0.2):
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker (pid {self.proc.pid}) not ready in time")
        if self.url is None:
            raise RuntimeError(f"worker (pid {self.proc.pid}) exited with code {self.proc.wait()} before it was ready")
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn`: the worker gets SIGTERM (it then stops its own children in order) when
    this process dies, and leaves ^C to us."""
    preload()

    def preexec() -> None:
        die_with_parent(parent_pid, signal.SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: we stop the workers in order

    return preexec


def run_data_parallel(args: ServerArgs, dp_size: int) -> int:
    """Serve with `dp_size` workers behind a cache-aware router until stopped; the exit code."""
    from radixflow.runtime.router.serve import run_router

    if dp_size < 1:
        print(f"radixflow: error: --dp-size must be >= 1, got {dp_size}", file=sys.stderr)
        return 2
    env = {**os.environ}
    if args.api_key is not None:
        env["RADIXFLOW_API_KEY"] = args.api_key
    workers: list[_Worker] = []
    try:
        workers = [_Worker(worker_argv(args), env) for _ in range(dp_size)]
        deadline = time.monotonic() + args.startup_timeout
        urls = tuple(w.wait_ready(deadline) for w in workers)
        rargs = RouterArgs(worker_urls=urls, host=args.host, port=args.port, api_key=args.api_key,
                           max_request_bytes=args.max_request_bytes, header_timeout=args.header_timeout,
                           body_timeout=args.body_timeout, allowed_origins=args.allowed_origins,
                           allowed_hosts=args.allowed_hosts, log_level=args.log_level)

        def dead_worker() -> str | None:
            return next((f"worker {w.url} exited with code {w.proc.returncode}" for w in workers
                         if w.proc.poll() is not None), None)

        return run_router(rargs, ready_prefix=_READY.strip(), watch=dead_worker)
    except RuntimeError as e:
        print(f"radixflow: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for w in workers:  # all at once, then wait for each
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.stop()
