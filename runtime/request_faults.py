"""How one request fails alone when handling it raises inside the engine.

A fault while sampling, masking, stop checking, computing logprobs or detokenizing one request
ends that request with an abort finish_reason whose message starts with "internal error" (the
HTTP layer answers it with a 500); the rest of its batch goes on. Faults in shared state (the
forward pass, the KV pool) are not caught: they still end the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# A failed row of a batch: (stage, exception).
Fault = tuple[str, BaseException]


def internal_error(what: str, exc: BaseException) -> str:
    """The abort message of a request that failed in stage `what` with `exc`."""
    return f"internal error: {what}: {type(exc).__name__}: {exc}"


def internal_abort(what: str, exc: BaseException) -> dict[str, Any]:
    """The wire finish_reason of a request that failed in stage `what` with `exc`."""
    return {"type": "abort", "message": internal_error(what, exc)}


def batched_or_each(fn: Callable[[list[int]], Sequence[T]], rows: list[int], faults: dict[int, Fault],
                    what: str) -> dict[int, T]:
    """`fn(rows)` (one result per row) as {row: result}. If the batched call raises, each row is
    retried alone and those that raise again are recorded in `faults` as (what, exception) and
    left out of the result."""
    if not rows:
        return {}
    try:
        results = fn(rows)
    except Exception as e:
        if len(rows) == 1:
            faults[rows[0]] = (what, e)
            return {}
        results = None  # the faulty row(s) are found below, one row at a time
    if results is not None:
        return dict(zip(rows, results, strict=True))
    out: dict[int, T] = {}
    for i in rows:
        try:
            out[i] = fn([i])[0]
        except Exception as e:
            faults[i] = (what, e)
    return out
