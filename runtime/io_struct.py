"""Messages between the tokenizer manager, the scheduler and the detokenizer.

All are plain picklable dataclasses (sent over ZeroMQ with send_pyobj); no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixflow.runtime.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReq:
    """One generation request (n == 1: the tokenizer manager expands n > 1 into n requests)."""

    rid: str
    input_text: str | None
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only; k: input logprobs from position k
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class RegisterReq:
    """How to turn one request's tokens into text. Sent by the tokenizer manager just before
    the request; the scheduler forwards it, so it always reaches the detokenizer first."""

    rid: str
    stop: list[str]
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_text_in_logprobs: bool = False
    stop_regex: list[str] = field(default_factory=list)


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class GetInfoReq:
    """Ask the scheduler for its state (pool usage, cache stats, queue lengths)."""


@dataclass
class InfoOut:
    info: dict[str, Any]


@dataclass
class FlushCacheOut:
    success: bool
    message: str = ""


@dataclass
class Heartbeat:
    """The scheduler has work and is alive: sent when no other message went out for
    about a second (e.g. during a long chunked prefill). `steps` counts scheduler steps."""

    steps: int


@dataclass
class ReqOutput:
    """What one request produced in one scheduler step (token ids only; text comes later).

    `new_token_ids` are the tokens appended since the last output for this request.
    `finish_reason` is None while running, else a dict in the wire format:
    {"type": "stop", "matched": <str|int>} | {"type": "length", "length": n} |
    {"type": "abort", "message": str}.
    Logprob entries are (logprob, token_id) pairs; top entries are lists of such pairs.
    """

    rid: str
    new_token_ids: list[int]
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Filled only when the request asked for logprobs; these are the new entries only.
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    # Stop-string bookkeeping for the detokenizer: the matched stop string, to trim.
    matched_stop_str: str | None = None
    # On the final output of a constrained request only: the grammar backend's report with the
    # spec ({"backend", "exact", "not_enforced", "approximated", "kind", "spec"}); the
    # detokenizer checks the text against the spec and reports meta_info["grammar"].
    grammar: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class BatchOutput:
    """Everything one scheduler step produced."""

    outputs: list[ReqOutput]
