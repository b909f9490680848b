"""The in-process Engine's inbox: the messages callers send its scheduler thread, and when
that thread stops reading them and steps (the burst policy).

Requests that reach an idle engine a few ms apart (the threads of a DSL run_batch, a fork's
branches) would otherwise start with whichever came first, and the rest would wait a whole step
behind them. So once requests start arriving at an idle engine, it waits for each next one while
they keep coming less than `gap` apart: arrival_gap_ms, but at most a tenth of a step (so the
wait stays small next to the step a straggler would lose), and 50 gaps in all. A hint that n
requests are coming (an `Expect` message) stretches that first wait until they have all arrived or its
deadline passes; it holds for the first step of a burst only.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from radixflow.runtime.io_struct import TokenizedGenerateReq

T = TypeVar("T")
Sink = Callable[[Any], None]  # gets each cumulative result dict of a request, then an end marker

_MAX_GAPS = 50  # a burst waits at most this many gaps in all
_STEP_FRACTION = 0.1  # a gap is at most this fraction of a mean step


@dataclass
class AddRequest:
    """Queue `req`; its results go to `sink`. `created`: time.perf_counter() at submission."""

    req: TokenizedGenerateReq
    return_text_in_logprobs: bool
    sink: Sink
    created: float


@dataclass
class Abort:
    rid: str


@dataclass
class Call:
    """Run `fn` on the scheduler thread between two steps; its result or exception goes to `future`."""

    fn: Callable[[], Any]
    future: Future


@dataclass
class Expect:
    """About `n` requests are coming before `deadline` (time.monotonic()): a hint for the
    burst policy, never seen by the engine's handler."""

    n: int
    deadline: float


@dataclass
class Stop:
    """Abort every request and end the scheduler thread."""


Message = AddRequest | Abort | Call | Expect | Stop


class BurstCollector:
    """Reads the scheduler thread's inbox, one iteration at a time: `begin(idle)`, then `next()`
    until it returns None (time to step), then the step itself through `run_step`. `Expect`
    hints are taken here and never returned. Used by the scheduler thread only, except
    `arrival_gap_ms`, which may be changed at any time from any thread (read at each `begin`)."""

    def __init__(self, inbox: queue.Queue, arrival_gap_ms: float) -> None:
        self.inbox = inbox
        self.arrival_gap_ms = arrival_gap_ms
        self.step_s = 0.05  # running mean of a step's duration
        self._expected = 0  # requests still expected (Expect), until _deadline
        self._deadline = 0.0
        self._block = True
        self._burst_end: float | None = None
        self._gap = 0.0

    def begin(self, idle: bool) -> None:
        """Start reading an iteration's messages; `idle`: the scheduler has no work, so wait
        for the first message."""
        self._block, self._burst_end = idle, None
        self._gap = min(self.arrival_gap_ms / 1000, _STEP_FRACTION * self.step_s)

    def next(self) -> AddRequest | Abort | Call | Stop | None:
        """The next message, or None when it is time to step: at once when there is none and
        no burst is being collected; during a burst, after waiting up to a gap for one."""
        while (msg := self._get()) is not None:
            if not isinstance(msg, Expect):
                self._arrived(isinstance(msg, AddRequest))
                return msg
            self._expected, self._deadline = msg.n, msg.deadline  # the burst is still to come
        return None

    def run_step(self, step: Callable[[], T], forwards: Callable[[], int] | None = None) -> T:
        """Run one scheduler step, ending any Expect hint and timing the step. With `forwards`
        (the scheduler's count of forward passes), only a step that ran one is timed: steps that
        only poll (requests waiting on their grammar) take microseconds and would shrink the mean."""
        self._expected = 0  # a hint only holds the first step of a burst
        before = forwards() if forwards is not None else None
        t = time.perf_counter()
        out = step()
        if forwards is None or forwards() != before:
            self.step_s = 0.8 * self.step_s + 0.2 * (time.perf_counter() - t)
        return out

    def _get(self) -> Message | None:
        try:
            if self._block:
                return self.inbox.get()
            gap, burst_end = self._gap, self._burst_end
            if burst_end is not None and self._expected > 0:
                gap = self._deadline - time.monotonic()
                burst_end = max(burst_end, self._deadline)
            wait = 0.0 if burst_end is None else min(gap, burst_end - time.monotonic())
            return self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _arrived(self, is_request: bool) -> None:
        """The first request to reach an idle engine starts a burst."""
        if self._block and is_request and self._gap > 0:
            self._burst_end = time.monotonic() + _MAX_GAPS * self._gap
        self._block = False
        if is_request and self._expected > 0:
            self._expected -= 1
