"""The server's scheduler process: the Scheduler fed from ZeroMQ instead of direct calls.

Inbound (PULL, from the tokenizer manager): one object or a list of them per message, each a
`TokenizedGenerateReq`, `AbortReq`, `FlushCacheReq`, `GetInfoReq` or `RegisterReq` (the last
is forwarded to the detokenizer ahead of the request it describes, on the same ordered socket).
Outbound (PUSH, to the detokenizer): one list per loop iteration, in order: forwarded
`RegisterReq`s, `InfoOut` / `FlushCacheOut` replies, then a `BatchOutput`; while it has work,
at least one list every `_HEARTBEAT_S` (a lone `Heartbeat` when nothing else went out), so the
HTTP process can tell a stalled scheduler from a busy one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import zmq

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.io_struct import (
    AbortReq,
    BatchOutput,
    FlushCacheOut,
    FlushCacheReq,
    GetInfoReq,
    Heartbeat,
    InfoOut,
    RegisterReq,
    TokenizedGenerateReq,
)
from radixflow.runtime.server.launch import bind_pull, connect_push, parent_alive, prepare_child

logger = logging.getLogger("radixflow.scheduler")

_IDLE_POLL_MS = 500  # while idle, wake this often to check the parent is alive
_HEARTBEAT_S = 1.0  # while busy, send something at least this often


class _StepLogger:
    """A log line every `interval` scheduler steps: throughput, batch, hit rate, queue depth.

    Rates are over busy time (the time spent in steps since the last line), not wall time: a
    server idle between requests still reports the speed at which it generates."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.last_step = 0
        self.last_time = time.perf_counter()
        self.last_gen = 0
        self.last_prompt = 0
        self.busy = 0.0  # seconds spent in steps since the last line

    def add_busy(self, seconds: float) -> None:
        self.busy += seconds

    def maybe_log(self, sched: Any) -> None:
        steps = sched.stats["steps"]
        if self.interval <= 0 or steps - self.last_step < self.interval:
            return
        info = sched.get_info()
        now = time.perf_counter()
        wall, busy = max(now - self.last_time, 1e-9), max(self.busy, 1e-9)
        gen = info["generated_tokens"] - self.last_gen
        prefill = info["computed_prompt_tokens"] - self.last_prompt
        pool = info["pool_size"]
        used = pool - info["free_slots"] - info["evictable_slots"]
        logger.info("steps %d: gen %.1f tok/s, prefill %.1f tok/s (over %.1f s busy, %.0f%% of %.1f s), "
                    "running %d, waiting %d, kv used %.1f%% (cached %d), cache hit rate %.1f%%, retractions %d",
                    steps, gen / busy, prefill / busy, self.busy, 100.0 * min(1.0, self.busy / wall), wall,
                    info["num_running"], info["num_waiting"], 100.0 * used / pool, info["evictable_slots"],
                    100.0 * info["cache"]["hit_rate"], info["retractions"])
        self.last_step, self.last_time, self.busy = steps, now, 0.0
        self.last_gen, self.last_prompt = info["generated_tokens"], info["computed_prompt_tokens"]


def run_scheduler_process(config: EngineConfig, model_path: str, in_addr: str, out_addr: str,
                          log_interval: int, log_level: str, ready: Connection, parent_pid: int) -> None:
    """Process entry point: build the Scheduler, report ready (with its info, vocab size and
    model path) and serve until the parent dies or SIGTERM."""
    prepare_child(parent_pid, log_level)
    try:
        from radixflow.runtime.scheduler.scheduler import Scheduler
        from radixflow.runtime.text.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(config.tokenizer or model_path)
        sched = Scheduler.from_model_path(config, model_path, tokenizer)
        ctx = zmq.Context()
        pull = bind_pull(ctx, in_addr)
        push = connect_push(ctx, out_addr)
    except BaseException:
        ready.send(("error", traceback.format_exc()))
        raise
    ready.send(("ready", {**sched.get_info(), "vocab_size": sched.runner.vocab_size}))
    ready.close()
    if config.tp_size > 1:
        # SIGTERM (the server stopping) unwinds through `finally`, so the tensor-parallel ranks get a
        # clean shutdown message (they would die with this process anyway).
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        _serve(sched, pull, push, _StepLogger(log_interval), parent_pid)
    finally:
        sched.close()


def _serve(sched: Any, pull: zmq.Socket, push: zmq.Socket, step_log: _StepLogger, parent_pid: int) -> None:
    last_sent = time.monotonic()
    wakeup = _Wakeup(pull)
    sched.set_grammar_wakeup(wakeup.set)
    while True:
        busy = sched.has_work()
        # while only grammars compile, sleep until one is done (or a message comes) instead of spinning
        if not wakeup.wait(0 if busy and not sched.only_compiling() else _IDLE_POLL_MS) and not busy:
            if not parent_alive(parent_pid):
                return
            continue
        out: list[Any] = []
        while True:
            try:
                msg = pull.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            for item in msg if isinstance(msg, list) else [msg]:
                _handle(sched, item, out)
        try:
            if sched.has_work():
                t0 = time.perf_counter()
                outputs = sched.step()
                step_log.add_busy(time.perf_counter() - t0)
            else:
                outputs = sched.drain_outputs()
        except Exception:
            logger.exception("scheduler step failed; failing every request and exiting")
            _fail_all(sched, push, out)
            raise
        if outputs:
            out.append(BatchOutput(outputs))
        now = time.monotonic()
        if not out and sched.has_work() and now - last_sent >= _HEARTBEAT_S:
            out.append(Heartbeat(sched.stats["steps"]))
        if out:
            push.send_pyobj(out)
            last_sent = now
        step_log.maybe_log(sched)


class _Wakeup:
    """Waits for a message on `pull` or a `set()` from another thread (a pipe the poll watches)."""

    def __init__(self, pull: zmq.Socket) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._poller = zmq.Poller()
        self._poller.register(pull, zmq.POLLIN)
        self._poller.register(self._r, zmq.POLLIN)

    def set(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:  # the pipe is full: a wakeup is pending anyway
            pass

    def wait(self, timeout_ms: int) -> bool:
        """Whether a message or a wakeup came within `timeout_ms` (the wakeups are consumed)."""
        events = dict(self._poller.poll(timeout_ms))
        if self._r in events:
            with contextlib.suppress(BlockingIOError):  # read until the pipe is empty
                while os.read(self._r, 4096):
                    pass
        return bool(events)


def _handle(sched: Any, item: Any, out: list[Any]) -> None:
    if isinstance(item, RegisterReq):
        out.append(item)
    elif isinstance(item, TokenizedGenerateReq):
        try:
            sched.add_request(item)
        except Exception as e:  # one bad request must not take the server down
            logger.exception("add_request(%s) failed", item.rid)
            _refuse(sched, item, f"internal error: could not queue the request: {type(e).__name__}: {e}")
    elif isinstance(item, AbortReq):
        sched.abort_request(item.rid)
    elif isinstance(item, GetInfoReq):
        out.append(InfoOut({**sched.get_info(), "scheduler_pid": os.getpid()}))
    elif isinstance(item, FlushCacheReq):
        out.append(FlushCacheOut(*sched.flush_cache()))
    else:
        logger.error("ignoring unknown message %r", type(item).__name__)


def _refuse(sched: Any, item: TokenizedGenerateReq, message: str) -> None:
    """Answer a request that add_request choked on with an abort, undoing what it queued."""
    sched.refuse(item.rid, len(item.input_ids), message)


def _fail_all(sched: Any, push: zmq.Socket, out: list[Any]) -> None:
    """Best effort after a crash: tell every client its request failed before exiting."""
    for rid in sched.request_ids():
        try:
            sched.abort_request(rid, "internal server error: the scheduler crashed")
        except Exception:  # the state may be corrupt; the process exits right after
            logger.exception("could not abort %s", rid)
    out.append(BatchOutput(sched.drain_outputs()))
    push.send_pyobj(out)
