"""Output collection: what the scheduler has to say about its requests since the last drain."""

from __future__ import annotations

from radixflow.runtime.intake import abort_output
from radixflow.runtime.io_struct import ReqOutput
from radixflow.runtime.req import Req


class OutputCollector:
    """Turns request progress into `ReqOutput`s (token ids only) and hands them out once, in
    the order they were produced."""

    def __init__(self) -> None:
        self._outbox: list[ReqOutput] = []

    def emit(self, req: Req) -> None:
        """Report req's tokens (and logprobs) not reported yet, and its finish reason if any."""
        new = req.output_ids[req.sent_len:]
        req.sent_len = len(req.output_ids)
        out = ReqOutput(
            rid=req.rid, new_token_ids=new, finish_reason=req.finish_reason,
            prompt_tokens=req.prompt_len, completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens, matched_stop_str=req.matched_stop_str,
            grammar=req.grammar_info if req.finish_reason is not None else None)
        if req.return_logprob:
            if req.pending_input_logprobs or req.pending_input_top:
                out.input_token_logprobs = req.pending_input_logprobs
                out.input_top_logprobs = req.pending_input_top
                req.pending_input_logprobs, req.pending_input_top = [], []
            out.output_token_logprobs, req.pending_output_logprobs = req.pending_output_logprobs, []
            out.output_top_logprobs, req.pending_output_top = req.pending_output_top, []
        self._outbox.append(out)

    def emit_error(self, rid: str, prompt_tokens: int, message: str) -> None:
        """Answer a request that never ran with an abort carrying `message`."""
        self._outbox.append(abort_output(rid, prompt_tokens, message))

    def has_output_for(self, rid: str) -> bool:
        """Whether an output for rid is waiting to be drained."""
        return any(o.rid == rid for o in self._outbox)

    def drain(self) -> list[ReqOutput]:
        """Every output since the last drain, oldest first; the collector is empty after."""
        out, self._outbox = self._outbox, []
        return out
