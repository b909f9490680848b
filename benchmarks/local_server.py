"""A `radixflow serve` (or `radixflow router`) subprocess for a benchmark: start it, wait for its
ready line, stop it. The benchmarks import this as `from local_server import ...` (they run as
scripts, with benchmarks/ on sys.path).

The ready line is the one the server prints once requests can be served
(`radixflow server ready on http://HOST:PORT`, the router's `radixflow router ready on ...`);
`--port 0` lets the server pick a free port, which the line names.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

SERVER_READY = "radixflow server ready on "
ROUTER_READY = "radixflow router ready on "


def start(argv: list[str], ready: str = SERVER_READY, env: dict[str, str] | None = None,
          stderr: IO[Any] | int | None = None, timeout: float = 900.0) -> tuple[subprocess.Popen, str]:
    """Run `radixflow ARGV` and wait up to `timeout` s for its ready line; (process, URL).

    SystemExit (the process killed) when the first line is not `ready` or does not come in time.
    The rest of its stdout is read and dropped, so a chatty server never blocks on a full pipe."""
    proc = subprocess.Popen([sys.executable, "-m", "radixflow.runtime.server.cli", *argv],
                            stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
    first: list[str] = []
    got = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not first:
                first.append(line.strip())
                got.set()
        got.set()  # EOF: the process exited before printing anything

    threading.Thread(target=read, daemon=True).start()
    got.wait(timeout)
    if not first or not first[0].startswith(ready):
        proc.kill()
        raise SystemExit(f"radixflow {argv[0]} failed to start (exit code {proc.wait()}): {first or 'no output'}")
    return proc, first[0][len(ready):].strip()


def serve_argv(opts: list[str], model: str | None = None) -> list[str]:
    """`serve --port 0 OPTS [--model MODEL]`: the arguments of a server on a free port."""
    return ["serve", "--port", "0", *opts, *(["--model", model] if model else [])]


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (the server stops its children in order), then SIGKILL after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(argv: list[str], **kw: Any) -> Iterator[str]:
    """`start(argv, **kw)` for the length of a `with` block, which gets the URL; stopped after."""
    proc, url = start(argv, **kw)
    try:
        yield url
    finally:
        stop(proc)

