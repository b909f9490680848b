"""Whether the pipeline behind the HTTP process (scheduler, detokenizer) makes progress.

Every message from the pipeline (results, replies, the scheduler's `Heartbeat`s) counts as
progress; the pipeline is stalled once requests have been in flight for `watchdog_timeout`
seconds without any. The tokenizer manager reports it in `health()` (/health answers 503).
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class StallWatch:
    """The time of the pipeline's last sign of progress, and whether that is too long ago."""

    def __init__(self, watchdog_timeout: float) -> None:
        self.watchdog_timeout = watchdog_timeout
        self._heard_at = time.monotonic()  # the last message from the pipeline, or work began
        self._stalled = False

    def heard(self) -> None:
        """The pipeline showed progress (or work began: the watchdog counts from then)."""
        self._heard_at = time.monotonic()

    def stalled_for(self, in_flight: int) -> float:
        """Seconds since the last progress while `in_flight` > 0 requests are in flight, else 0."""
        return time.monotonic() - self._heard_at if in_flight else 0.0

    def problem(self, in_flight: int) -> str | None:
        """Why the pipeline counts as stalled, or None."""
        stalled = self.stalled_for(in_flight)
        if stalled > self.watchdog_timeout:
            return (f"the scheduler made no progress for {stalled:.0f}s with {in_flight} requests in flight "
                    f"(watchdog timeout {self.watchdog_timeout:g}s)")
        return None

    def log_changes(self, in_flight: int) -> None:
        """Log when the pipeline starts and stops stalling (once each)."""
        problem = self.problem(in_flight)
        if problem is not None and not self._stalled:
            logger.error("unhealthy: %s", problem)
        elif problem is None and self._stalled:
            logger.warning("the scheduler makes progress again")
        self._stalled = problem is not None
