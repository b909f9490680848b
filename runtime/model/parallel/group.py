"""The tensor-parallel process group and the processes of its ranks.

Rank 0 (the scheduler's process) starts the ranks of its own node (1 .. tp/nnodes - 1) as
`python -m radixflow.runtime.model.parallel.worker` subprocesses, which read their arguments as a
pickle on stdin; a node with node_rank > 0 starts all of its ranks the same way (`run_node`).
Workers die with the process that started them (PR_SET_PDEATHSIG, plus a parent check on every
heartbeat) and exit when rank 0's connection drops. Every wait is bounded by `dist_timeout`.
(Linux sends PR_SET_PDEATHSIG when the *thread* that started the worker ends: create a
tensor-parallel engine on a thread that lives as long as the engine, e.g. the main thread.)

Collectives: `device_pg` (NCCL on CUDA, gloo on CPU) carries the all-reduces and the logits
gather; `cpu_pg` (gloo) carries rank 0's commands (protocol.py); a TCPStore at the init address
is the rendezvous and carries start-up errors.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from radixflow.runtime.config import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker process is started with (pickled to its stdin)."""

    config: EngineConfig
    model_path: str
    rank: int
    init_addr: str
    parent_pid: int


@dataclass
class TPGroup:
    """This process's place in the group: `rank` of `size`, `local_rank` on its node, its device,
    and the group's collectives (process-group objects of its own: no torch.distributed globals,
    so one process may hold several groups, one per engine)."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    store: dist.Store
    device_pg: Any  # NCCL on CUDA, gloo on CPU: the all-reduces and the logits gather
    cpu_pg: Any  # gloo: rank 0's commands and start-up messages
    procs: list[subprocess.Popen] = field(default_factory=list)  # workers this process started

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns x."""
        self.device_pg.allreduce([x]).wait()
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (same shape) on rank 0, in rank order; None on the others."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        self.device_pg.gather(parts, x, 0).wait()
        return parts if self.rank == 0 else None

    def broadcast_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU tensor `x` into every rank's `x` (control group); returns x."""
        self.cpu_pg.broadcast(x, 0).wait()
        return x

    def share_ints(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank (the others pass placeholders of the same length)."""
        return self.broadcast_cpu(torch.tensor(values, dtype=torch.int64)).tolist()

    @contextlib.contextmanager
    def loading_together(self) -> Iterator[None]:
        """Wrap each rank's start-up: every rank learns whether all succeeded. A rank that failed
        raises its own error; the others raise RuntimeError naming it and its message."""
        try:
            yield
        except Exception as e:
            self._report(f"{type(e).__name__}: {e}")
            raise
        self._report("")

    def _report(self, error: str) -> None:
        self.store.set(f"started/{self.rank}", error)
        for rank in range(self.size):
            key = f"started/{rank}"
            deadline = time.monotonic() + self.store.timeout.total_seconds()
            while not self.store.check([key]):  # a worker that died without a word fails us now
                dead = exited_worker(self.procs)
                if dead is not None or time.monotonic() > deadline:
                    raise RuntimeError(dead or f"tensor-parallel rank {rank} did not start in time")
                time.sleep(0.05)
            message = self.store.get(key).decode()
            if message and not error:
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {message}")

    def destroy(self) -> None:
        """Stop the workers this process started (after SHUTDOWN they exit by themselves) and drop
        the collectives. Idempotent."""
        stop_processes(self.procs, timeout=10.0)
        self.device_pg = self.cpu_pg = None


def ranks_per_node(config: EngineConfig) -> int:
    return config.tp_size // config.nnodes


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    """Rank `local_rank` of a node runs on cuda:(base + local_rank) on a GPU, else the CPU."""
    device = config.resolved_device()
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + local_rank)


def free_local_addr() -> str:
    """127.0.0.1:PORT with a port the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def init_group(config: EngineConfig, rank: int, init_addr: str, procs: list[subprocess.Popen] | None = None) -> TPGroup:
    """Join the group of config.tp_size ranks as `rank`: rendezvous at init_addr (HOST:PORT; rank 0
    listens there), every wait bounded by config.dist_timeout."""
    local_rank = rank % ranks_per_node(config)
    device = rank_device(config, local_rank)
    timeout = datetime.timedelta(seconds=config.dist_timeout)
    host, _, port = init_addr.rpartition(":")
    store = dist.TCPStore(host, int(port), config.tp_size, is_master=rank == 0, timeout=timeout)
    cpu_pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank, config.tp_size, timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        device_pg = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, config.tp_size, options)
    else:
        device_pg = cpu_pg
    return TPGroup(rank, config.tp_size, local_rank, device, store, device_pg, cpu_pg, procs or [])


def start_rank0(config: EngineConfig, model_path: str) -> TPGroup:
    """Rank 0's side: start this node's worker ranks and join the group with them."""
    if config.node_rank != 0:
        raise ValueError(f"node_rank {config.node_rank} runs only its worker ranks (`radixflow serve` does "
                         "that), not an engine")
    check_devices(config)
    addr = config.dist_init_addr or free_local_addr()
    procs = spawn_workers(config, model_path, range(1, ranks_per_node(config)), addr)
    result: list[TPGroup | BaseException] = []

    def join() -> None:
        try:
            result.append(init_group(config, 0, addr, procs))
        except BaseException as e:
            result.append(e)

    # The rendezvous blocks; watched from here, a worker that dies on the way fails the start at once
    # instead of after dist_timeout (the abandoned join then ends at its own timeout).
    joiner = threading.Thread(target=join, name="radixflow-tp-join", daemon=True)
    joiner.start()
    dead = None
    while joiner.is_alive() and (dead := exited_worker(procs)) is None:
        joiner.join(0.05)
    if not result or isinstance(result[0], BaseException):
        stop_processes(procs, timeout=5.0)
        if result:
            raise result[0]
        raise RuntimeError(dead)
    return result[0]


def exited_worker(procs: list[subprocess.Popen]) -> str | None:
    """A message naming a worker process that has exited, or None while all run."""
    for p in procs:
        if p.poll() is not None:
            return f"a tensor-parallel worker (pid {p.pid}) exited with code {p.returncode} during start-up"
    return None


def check_devices(config: EngineConfig) -> None:
    """ValueError when this node has fewer GPUs than its ranks need."""
    last = rank_device(config, ranks_per_node(config) - 1)
    if last.type == "cuda" and last.index >= torch.cuda.device_count():
        raise ValueError(f"tp_size {config.tp_size} over {config.nnodes} node(s) needs {last} on this node, "
                         f"which has {torch.cuda.device_count()} GPU(s)")


def spawn_workers(config: EngineConfig, model_path: str, ranks: range, init_addr: str) -> list[subprocess.Popen]:
    """Start one worker process per rank in `ranks`; they die with this process."""
    procs = []
    # -P: the working directory (a checkout's root, whose kernels/ folder shadows a pip package
    # transformers imports) does not go on the workers' sys.path.
    cmd = [sys.executable, "-P", "-m", "radixflow.runtime.model.parallel.worker"]
    for rank in ranks:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        procs.append(p)
        assert p.stdin is not None
        args = WorkerArgs(config, os.path.abspath(model_path), rank, init_addr, os.getpid())
        try:
            p.stdin.write(pickle.dumps(args))
        except BrokenPipeError:  # it died at once: the caller sees it exit
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                p.stdin.close()
    return procs


def stop_processes(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait up to `timeout` s for each process to exit, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("tensor-parallel worker %d did not exit: killing it", p.pid)
            p.kill()
            p.wait(5)


def run_node(config: EngineConfig, model_path: str) -> int:
    """A node with node_rank > 0: run its worker ranks until they exit (rank 0's shutdown, or
    its loss); returns 0 if all exited cleanly, else 1."""
    check_devices(config)
    n = ranks_per_node(config)
    first = config.node_rank * n
    procs = spawn_workers(config, model_path, range(first, first + n), config.dist_init_addr or "")
    logger.info("node %d: tensor-parallel ranks %d..%d started", config.node_rank, first, first + n - 1)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        stop_processes(procs, timeout=10.0)
    return 0 if all(p.returncode == 0 for p in procs) else 1
