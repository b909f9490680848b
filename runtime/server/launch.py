"""The server's child processes (scheduler, detokenizer): spawn, wait until ready, watch, stop.

Sockets (ZeroMQ ipc; every PULL binds, every PUSH connects):
    tokenizer manager --PUSH--> `scheduler`   --> scheduler process
    scheduler process --PUSH--> `detokenizer` --> detokenizer process
    detokenizer       --PUSH--> `tokenizer`   --> tokenizer manager (HTTP process)
On Linux the endpoints are abstract-namespace names (`ipc://@radixflow-PID-RANDOM-NAME`): no file
exists, so nothing is left behind even after SIGKILL. Abstract names are open to every local user,
so `bind_pull` accepts only peers of our own uid (ZMQ_IPC_FILTER_UID; messages are pickles).
Elsewhere they are `.ipc` files in a private temp dir that the caller removes.

A child reports ("ready", info) or ("error", traceback) once over a one-way pipe. Children die
with their parent: PR_SET_PDEATHSIG on Linux, plus a parent-pid check in their loops.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import zmq

from radixflow.runtime.child_process import die_with_parent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IpcAddresses:
    """ZeroMQ endpoints of the three PULL sockets."""

    scheduler: str
    detokenizer: str
    tokenizer: str

    @classmethod
    def in_dir(cls, folder: str) -> IpcAddresses:
        return cls(*(f"ipc://{os.path.join(folder, name)}.ipc" for name in _NAMES))

    @classmethod
    def abstract(cls) -> IpcAddresses:
        """Linux abstract-namespace endpoints, unique to this process and call."""
        tag = f"radixflow-{os.getpid()}-{secrets.token_hex(8)}"
        return cls(*(f"ipc://@{tag}-{name}" for name in _NAMES))


_NAMES = ("scheduler", "detokenizer", "tokenizer")


def abstract_ipc_supported() -> bool:
    """True where abstract ipc endpoints can be limited to our uid (Linux with a libzmq that has
    SO_PEERCRED filters)."""
    if not sys.platform.startswith("linux") or not hasattr(zmq, "IPC_FILTER_UID"):
        return False
    sock = zmq.Context.instance().socket(zmq.PULL)
    try:
        sock.setsockopt(zmq.IPC_FILTER_UID, os.getuid())
        return True
    except zmq.ZMQError:
        return False
    finally:
        sock.close(0)


def bind_pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    """A PULL socket bound to `addr` (no receive limit) that accepts only our own uid's processes
    on an abstract endpoint."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    if addr.startswith("ipc://@"):
        sock.setsockopt(zmq.IPC_FILTER_UID, os.getuid())
    sock.bind(addr)
    return sock


def connect_push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    """A PUSH socket connected to `addr`: no send limit, and no lingering on close."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


def prepare_child(parent_pid: int, log_level: str = "info") -> None:
    """Call first in a child: die with the parent, leave SIGINT to the parent, set up logging.
    Exits at once if the parent is already gone."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the parent stops us in order
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(processName)s %(levelname)s %(message)s")


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


class ChildProcesses:
    """The scheduler and detokenizer processes of one server ("spawn" start method)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: dict[str, mp.process.BaseProcess] = {}
        self._pipes: dict[str, Connection] = {}

    def spawn(self, name: str, target: Any, *args: Any) -> None:
        """Start `target(*args, ready_conn, parent_pid)` in a new process called `name`."""
        recv, send = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=target, args=(*args, send, os.getpid()), name=name, daemon=True)
        p.start()
        send.close()
        self.procs[name] = p
        self._pipes[name] = recv

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until every child reported ready; return {name: info}. Raises RuntimeError
        (with the child's traceback) if one fails, dies or takes longer than `timeout` s."""
        infos: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while len(infos) < len(self._pipes):
            for name, conn in self._pipes.items():
                if name in infos:
                    continue
                if conn.poll(0.05):
                    try:
                        kind, payload = conn.recv()
                    except EOFError:
                        kind, payload = "error", "exited before reporting ready"
                    if kind != "ready":
                        raise RuntimeError(f"the {name} process failed to start:\n{payload}")
                    infos[name] = payload
                elif not self.procs[name].is_alive():
                    raise RuntimeError(f"the {name} process died during start-up "
                                       f"(exit code {self.procs[name].exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server processes not ready after {timeout:.0f}s")
        return infos

    def dead(self) -> str | None:
        """Name and exit code of a child that has exited, or None while all run."""
        for name, p in self.procs.items():
            if not p.is_alive():
                return f"{name} (exit code {p.exitcode})"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every child, then SIGKILL those still alive after `timeout` s. Idempotent."""
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("%s did not stop in %.0fs: killing it", p.name, timeout)
                p.kill()
                p.join(2)
        for conn in self._pipes.values():
            conn.close()
        self._pipes.clear()
