"""Helpers for the end-to-end server tests: start `radixflow serve` as a real subprocess on a
free loopback port and drive it over HTTP.

`shared_server()` is one server per test session (all server test modules use it; restarted if
a test stopped it). It requires API key `API_KEY`. RADIXFLOW_TEST_MODEL overrides the model
(default: the default model).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx
import psutil

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
POOL_SIZE = 3072
SHARED_ARGS = ["--max-total-tokens", str(POOL_SIZE), "--max-running-requests", "64", "--api-key", API_KEY,
               "--max-n", "4", "--max-new-tokens-limit", "512", "--max-request-bytes", "200000",
               "--log-interval", "0", "--log-level", "warning",
               # The exact fp32 path, as the session's `engine` fixture runs: tests compare the two, and
               # batched against single runs (the quantized kernels round differently below 8 rows).
               "--quantization", "none", "--kv-cache-dtype", "float32"]


class ServerProcess:
    """`radixflow serve --port 0 ARGS` in a subprocess (with `env` added to the environment);
    `url` once its ready line was printed."""

    def __init__(self, args: list[str], timeout: float = 600.0, env: dict[str, str] | None = None) -> None:
        model = os.environ.get("RADIXFLOW_TEST_MODEL")
        cmd = [sys.executable, "-m", "radixflow.runtime.server.cli", "serve", "--port", "0", *args]
        if model:
            cmd += ["--model", model]
        # The server's temp files (IPC sockets) and its log live in a folder of ours, removed by
        # cleanup(): a server killed with SIGKILL cannot remove its own.
        self.tmpdir = tempfile.mkdtemp(prefix="radixflow-test-")
        self.log_path = os.path.join(self.tmpdir, "server.log")
        env = {**os.environ, **(env or {}), "TMPDIR": self.tmpdir}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self.stdout_lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.stdout_lines.append(line.rstrip("\n"))
                ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
        if not self.stdout_lines:
            log = self.log_text()
            self.kill()
            raise RuntimeError(f"server did not start (exit code {self.proc.poll()}):\n{log}")
        line = self.stdout_lines[0]
        prefix = "radixflow server ready on "
        assert line.startswith(prefix), line
        self.url = line[len(prefix):]
        self.pid = self.proc.pid

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; returns its exit code (kills it after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.cleanup()
        return self.proc.returncode

    def cleanup(self) -> None:
        """Remove the server's temp folder (call once it has exited)."""
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def kill(self) -> None:
        for p in self.descendants():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.cleanup()

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.url, headers=AUTH, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 300.0)
        return httpx.AsyncClient(base_url=self.url, headers=AUTH, **kwargs)


_shared: ServerProcess | None = None


def shared_server() -> ServerProcess:
    """The session's shared server (started on first use, or again if a test stopped it)."""
    global _shared
    if _shared is None or not _shared.alive():
        _shared = ServerProcess(SHARED_ARGS)
    return _shared


def stop_shared_server() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


atexit.register(stop_shared_server)


def wait_pool_whole(client: httpx.Client, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /get_server_info until no request runs or waits and every KV slot is free or
    evictable; return the info. Fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = client.get("/get_server_info").json()
        if (info["num_running"] == 0 and info["num_waiting"] == 0
                and info["free_slots"] + info["evictable_slots"] == info["pool_size"]):
            return info
        time.sleep(0.2)
    raise AssertionError(f"KV pool not whole after {timeout}s: {info}")


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is a JSON error with this status (and code); returns the error object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "type" in err and "code" in err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_engine_pool_whole(engine: Any) -> None:
    """For an in-process Engine: wait (up to 10 s) until no request runs or waits, then assert the
    KV pool invariant, nothing protected or held, and every slot free or evictable."""
    for _ in range(200):
        info = engine.get_server_info()
        if info["num_running"] == 0 and info["num_waiting"] == 0:
            break
        time.sleep(0.05)
    engine.check_invariant()
    info = engine.get_server_info()
    assert info["num_running"] == 0 and info["num_waiting"] == 0
    assert info["protected_slots"] == 0 and info["held_by_requests"] == 0
    assert info["free_slots"] + info["evictable_slots"] == info["pool_size"]
