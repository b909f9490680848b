"""Finish conditions of one request after it got a new token."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from radixflow.runtime.req import Req

_REGEX_TAIL_CHARS = 256  # the text a stop_regex without a bounded match length is searched in


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> tuple[re.Pattern[str], int]:
    """The compiled pattern and how many trailing characters a new match can span: its longest
    match where the regex bounds it, else _REGEX_TAIL_CHARS."""
    compiled = re.compile(pattern)
    try:
        parser = getattr(re, "_parser", None) or __import__("sre_parse")
        width = parser.parse(pattern).getwidth()[1]
    except Exception:  # a private parser API; any failure only means "unbounded"
        width = _REGEX_TAIL_CHARS
    return compiled, min(int(width), _REGEX_TAIL_CHARS)


def _regex_stop(stop_regex: list[str], out: list[int], decode: Callable[[list[int]], str]) -> str | None:
    """The text of the earliest stop_regex match in the output's tail, or None."""
    patterns = [_compiled(p) for p in stop_regex]
    span = max(w for _, w in patterns)
    # A match of W characters spans at most W + 1 tokens; a few more cover odd splits.
    tail = decode(out[-(span + 3):])
    hits = [next(((m.start(), m.group(0)) for m in c.finditer(tail) if m.group(0)), None) for c, _ in patterns]
    hits = [h for h in hits if h is not None]
    return min(hits)[1] if hits else None


def check_finished(req: Req, context_length: int, decode: Callable[[list[int]], str]) -> None:
    """Set req.finish_reason (wire format) if the last output token ends the request.

    Order: grammar termination, stop token ids, EOS, stop strings, max_new_tokens, context.
    Stop strings and stop_regex patterns are searched in the decoded tail of the output, so
    they are found even when they span tokens; stop tokens, strings and patterns count only
    after min_new_tokens outputs. A pattern's match becomes `matched_stop_str` (the text is
    trimmed at it, as at a stop string)."""
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
        if p.stop_regex:
            matched = _regex_stop(p.stop_regex, out, decode)
            if matched is not None:
                req.matched_stop_str = matched
                req.finish_reason = {"type": "stop", "matched": matched}
                return
    if n >= p.max_new_tokens:
        req.finish_reason = {"type": "length", "length": p.max_new_tokens}
    elif req.seq_len >= context_length:
        req.finish_reason = {"type": "length", "length": n}
