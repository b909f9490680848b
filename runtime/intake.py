"""Request intake, written once for every entry point (the in-process Engine, the native API,
the OpenAI API): the request-level options, the prompt check, the n fan-out, and the result of
a request that is aborted before or instead of running.

Every check raises ValueError (RequestError for prompts) with a message naming the field; the
HTTP layer answers it with a 400, the Engine raises it as is.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from typing import Any

from radixflow.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixflow.runtime.sampling_params import SamplingParams, copy_seed
from radixflow.runtime.validation import check_logprob_args

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the error code, and the marker in messages


class RequestError(ValueError):
    """A request the engine can never serve (empty, out-of-vocabulary ids, too long). `param`
    names the field at fault; `code` is "context_length_exceeded" when the prompt and its new
    tokens do not fit, and that marker is then also in the message."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class GenerateOptions:
    """The request-level options of a generate call (the rest are sampling parameters). Build
    with the caller's values, then `validate` before use."""

    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output tokens only; k: input logprobs from position k
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self, max_top_logprobs: int) -> GenerateOptions:
        """Return self; raise ValueError naming the field unless the flags are booleans,
        logprob_start_len an int >= -1 and top_logprobs_num an int in [0, max_top_logprobs]."""
        for name in ("return_logprob", "return_text_in_logprobs", "stream"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")
        check_logprob_args(self.logprob_start_len, self.top_logprobs_num, max_top_logprobs)
        return self


def check_prompt(input_ids: list[int], max_new_tokens: int, *, vocab_size: int, context_length: int,
                 pool_size: int) -> None:
    """Raise RequestError unless `input_ids` is a non-empty prompt of ids in [0, vocab_size)
    that, with `max_new_tokens` more, fits the context length, and fits the KV pool."""
    if not input_ids:
        raise RequestError("the prompt is empty: at least one input token is required", param="prompt")
    bad = next((t for t in input_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"input token id {bad} is out of range [0, {vocab_size})", param="input_ids")
    n = len(input_ids)
    if n >= context_length:
        raise RequestError(f"the prompt has {n} tokens; this model's context length is {context_length} "
                           f"({CONTEXT_LENGTH_EXCEEDED})", param="prompt", code=CONTEXT_LENGTH_EXCEEDED)
    if n + max_new_tokens > context_length:
        raise RequestError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length "
                           f"{context_length} ({CONTEXT_LENGTH_EXCEEDED})", param="prompt",
                           code=CONTEXT_LENGTH_EXCEEDED)
    if n + 1 > pool_size:
        raise RequestError(f"the prompt ({n} tokens) does not fit the KV pool ({pool_size} tokens) "
                           f"({CONTEXT_LENGTH_EXCEEDED})", param="prompt", code=CONTEXT_LENGTH_EXCEEDED)


def fan_out(rid: str | None, params: SamplingParams, input_ids: list[int], *, input_text: str | None = None,
            options: GenerateOptions | None = None) -> list[TokenizedGenerateReq]:
    """The `params.n` requests of one prompt, each with n == 1: copy i has rid `base` when n == 1,
    else `base-i` (base: `rid`, or a fresh uuid when None), and seed `copy_seed(params.seed, i)`,
    so the copies of a seeded request differ from each other and repeat across runs."""
    options = options or GenerateOptions()
    base = rid or uuid.uuid4().hex
    return [TokenizedGenerateReq(
        rid=base if params.n == 1 else f"{base}-{i}", input_text=input_text, input_ids=input_ids,
        sampling_params=params.replace(n=1, seed=copy_seed(params.seed, i)), return_logprob=options.return_logprob,
        logprob_start_len=options.logprob_start_len, top_logprobs_num=options.top_logprobs_num,
        stream=options.stream) for i in range(params.n)]


def abort_output(rid: str, prompt_tokens: int, message: str) -> ReqOutput:
    """The scheduler's output for a request answered with an abort before it produced anything."""
    return ReqOutput(rid=rid, new_token_ids=[], finish_reason={"type": "abort", "message": message},
                     prompt_tokens=prompt_tokens, completion_tokens=0, cached_tokens=0)


def abort_result(rid: str, message: str, *, prompt_tokens: int = 0,
                 e2e_latency: float | None = None) -> dict[str, Any]:
    """The native result dict of a request failed with `message` outside the scheduler (a dead
    process, a timeout, a shutdown): no text, no tokens, finish_reason abort."""
    meta: dict[str, Any] = {"id": rid, "prompt_tokens": prompt_tokens, "completion_tokens": 0, "cached_tokens": 0,
                            "finish_reason": {"type": "abort", "message": message}}
    if e2e_latency is not None:
        meta["e2e_latency"] = e2e_latency
    return {"text": "", "output_ids": [], "meta_info": meta}
