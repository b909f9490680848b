"""What the HTTP process holds for its requests: the prepared requests of one call, the state
of each in-flight request, a call's submission, and the API error answered to a client.

The `TokenizerManager` (tokenizer_manager.py) creates and changes these; the routes read them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from radixflow.runtime.intake import CONTEXT_LENGTH_EXCEEDED
from radixflow.runtime.io_struct import RegisterReq, TokenizedGenerateReq


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "code", "param"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, code: str | None = None, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


@dataclass
class Prepared:
    """Validated requests of one HTTP call: n copies of each prompt, in prompt order."""

    reqs: list[TokenizedGenerateReq]
    registers: list[RegisterReq]
    prompt_index: list[int]  # for each request, the index of its prompt
    groups: dict[str, list[str]]  # a caller-given rid -> the rids of its n > 1 copies


@dataclass(eq=False)
class ReqState:
    """What the HTTP process knows about one in-flight request. `result` is the latest
    cumulative native result dict; `seq` counts updates."""

    rid: str
    stream: bool
    event: asyncio.Event
    created: float
    result: dict[str, Any] | None = None
    seq: int = 0
    finished: bool = False
    aborted_by_user: bool = False  # /abort_request: the abort result is a normal answer
    failed: bool = False  # the server failed it (a process died, shutdown)
    timed_out: bool = False  # aborted after args.request_timeout
    tokens_seen: int = 0
    last_at: float = 0.0


@dataclass(eq=False)
class Submission:
    states: list[ReqState]
    prompt_index: list[int]
    groups: dict[str, list[str]]
    event: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: bool = False  # the client went away; its requests were aborted

    def error(self) -> APIError | None:
        """The APIError for the first request that failed (not aborted by the user), or None."""
        for st in self.states:
            fr = (st.result or {}).get("meta_info", {}).get("finish_reason") or {}
            if fr.get("type") != "abort" or st.aborted_by_user:
                continue
            msg = fr.get("message") or "request aborted"
            if st.timed_out:
                return APIError(504, msg, "server_error", "request_timeout")
            if st.failed:
                return APIError(503, msg, "server_error", "service_unavailable")
            if msg.startswith("internal"):
                return APIError(500, msg, "server_error", "internal_error")
            code = CONTEXT_LENGTH_EXCEEDED if CONTEXT_LENGTH_EXCEEDED in msg else None
            return bad_request(msg, code)
        return None
