"""Finish conditions of one request after it got a new token."""

from __future__ import annotations

from collections.abc import Callable

from radixflow.runtime.req import Req


def check_finished(req: Req, context_length: int, decode: Callable[[list[int]], str]) -> None:
    """Set req.finish_reason (wire format) if the last output token ends the request.

    Order: grammar termination, stop token ids, EOS, stop strings, max_new_tokens, context.
    Stop strings are searched in the decoded tail of the output, so they are found even when
    they span tokens; stop tokens and strings count only after min_new_tokens outputs."""
    p = req.params
    out = req.output_ids
    t = out[-1]
    n = len(out)
    if req.grammar is not None and req.grammar.is_terminated():
        req.finish_reason = {"type": "stop", "matched": t}
        return
    if n >= p.min_new_tokens:
        if t in p.stop_token_ids:
            req.finish_reason = {"type": "stop", "matched": t}
            return
        if not p.ignore_eos and t in req.eos_token_ids:
            req.finish_reason = {"type": "stop", "matched": t}
            return
        if p.stop:
            longest = max(len(s) for s in p.stop)
            # A string of L characters spans at most L + 1 tokens; a few more cover odd splits.
            tail = decode(out[-(longest + 3):])
            hits = [(tail.find(s), s) for s in p.stop if s in tail]
            if hits:
                req.matched_stop_str = min(hits)[1]
                req.finish_reason = {"type": "stop", "matched": req.matched_stop_str}
                return
    if n >= p.max_new_tokens:
        req.finish_reason = {"type": "length", "length": p.max_new_tokens}
    elif req.seq_len >= context_length:
        req.finish_reason = {"type": "length", "length": n}
