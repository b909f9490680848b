"""Token ids -> text for each request: incremental decoding, stop-string trimming, wire format.

Used in-process by the offline Engine and inside the server's detokenizer process."""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

import regex

from radixflow.grammars.output_check import grammar_report
from radixflow.runtime.intake import abort_result
from radixflow.runtime.io_struct import ReqOutput
from radixflow.runtime.request_faults import internal_error
from radixflow.runtime.text.tokenizer import IncrementalDecoder, Tokenizer

logger = logging.getLogger(__name__)


class _State:
    def __init__(self, decoder: IncrementalDecoder, stop: list[str], stop_regex: list[str], no_stop_trim: bool,
                 return_text_in_logprobs: bool, created: float) -> None:
        self.decoder = decoder
        self.stop = stop
        self.stop_regex = stop_regex
        self.no_stop_trim = no_stop_trim
        self.text_in_lp = return_text_in_logprobs
        self.created = created
        self.text = ""
        self.output_ids: list[int] = []
        self.input_token_logprobs: list = []
        self.input_top_logprobs: list = []
        self.output_token_logprobs: list = []
        self.output_top_logprobs: list = []
        self.has_logprobs = False


class Detokenizer:
    """Holds per-request decoding state between `register` and the request's final output."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _State] = {}

    def register(self, rid: str, *, stop: list[str] | None = None, stop_regex: list[str] | None = None,
                 no_stop_trim: bool = False,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                 return_text_in_logprobs: bool = False, created: float | None = None) -> None:
        dec = IncrementalDecoder(self.tokenizer, skip_special_tokens=skip_special_tokens,
                                 spaces_between_special_tokens=spaces_between_special_tokens)
        self.states[rid] = _State(dec, list(stop or []), list(stop_regex or []), no_stop_trim, return_text_in_logprobs,
                                  created if created is not None else time.perf_counter())

    def discard(self, rid: str) -> None:
        self.states.pop(rid, None)

    def process(self, out: ReqOutput) -> dict[str, Any] | None:
        """Fold one scheduler output into the request's state; return the cumulative result dict
        (native /generate format). Returns None for an unknown (discarded) request."""
        st = self.states.get(out.rid)
        if st is None:
            return None
        st.output_ids.extend(out.new_token_ids)
        st.text += st.decoder.step(out.new_token_ids)
        if out.finished:
            st.text += st.decoder.flush() if hasattr(st.decoder, "flush") else ""
        text = st.text
        if out.finished and out.matched_stop_str is not None and not st.no_stop_trim:
            cut = text.find(out.matched_stop_str)
            if cut >= 0:
                text = text[:cut]
        elif not out.finished:  # hold back what may still become a stop string or a stop_regex match
            if st.stop:
                text = text[:len(text) - _partial_stop_suffix(text, st.stop)]
            if st.stop_regex:
                text = text[:partial_regex_start(text, st.stop_regex)]
        self._fold_logprobs(st, out)
        meta: dict[str, Any] = {
            "id": out.rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "finish_reason": out.finish_reason,
            "e2e_latency": time.perf_counter() - st.created,
        }
        if st.has_logprobs:
            meta.update(input_token_logprobs=st.input_token_logprobs,
                        input_top_logprobs=st.input_top_logprobs,
                        output_token_logprobs=st.output_token_logprobs,
                        output_top_logprobs=st.output_top_logprobs)
        if out.finished:
            self.states.pop(out.rid, None)
            if out.grammar is not None:  # the finished text against the spec the client sent
                meta["grammar"] = grammar_report(out.grammar, text, out.finish_reason)
        return {"text": text, "output_ids": list(st.output_ids), "meta_info": meta}

    def process_or_abort(self, out: ReqOutput) -> dict[str, Any] | None:
        """As `process`, but if processing raises, the request's state is dropped and its result
        is an internal-error abort (its text so far is lost); other requests are not touched."""
        try:
            return self.process(out)
        except Exception as e:
            logger.exception("detokenizing %s failed", out.rid)
            self.discard(out.rid)
            return abort_result(out.rid, internal_error("detokenizing", e), prompt_tokens=out.prompt_tokens)

    def _entry(self, st: _State, lp: float | None, tid: int) -> list:
        return [lp, tid, self.tokenizer.decode([tid], skip_special_tokens=False) if st.text_in_lp else None]

    def _fold_logprobs(self, st: _State, out: ReqOutput) -> None:
        if out.input_token_logprobs is not None:
            st.has_logprobs = True
            st.input_token_logprobs += [self._entry(st, lp, t) for lp, t in out.input_token_logprobs]
            st.input_top_logprobs += [None if top is None else [self._entry(st, lp, t) for lp, t in top]
                                      for top in (out.input_top_logprobs or [])]
        if out.output_token_logprobs:
            st.has_logprobs = True
            st.output_token_logprobs += [self._entry(st, lp, t) for lp, t in out.output_token_logprobs]
            st.output_top_logprobs += [[self._entry(st, lp, t) for lp, t in top]
                                       for top in out.output_top_logprobs]


def _partial_stop_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string
    (held back while streaming so a stop string never shows up half-emitted)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


_REGEX_TAIL_CHARS = 256  # as the scheduler's stop check: a match is looked for this far back at most


def partial_regex_start(text: str, patterns: list[str]) -> int:
    """Where in `text` the earliest match of a pattern that runs into the end of the text (a
    match that more text could extend or complete) starts; len(text) if none. A streamed stop_regex
    match is held back from there, so it is never sent before it is trimmed. Patterns the `regex`
    module cannot compile (all that `re` accepts but a few) hold nothing back."""
    start = max(0, len(text) - _REGEX_TAIL_CHARS)
    cut = len(text)
    for p in patterns:
        try:
            compiled = _partial_pattern(p)
        except regex.error:
            continue
        for m in compiled.finditer(text, start, partial=True):
            if m.end() == len(text) and m.start() < cut:
                cut = m.start()
                break
    return cut


@lru_cache(maxsize=256)
def _partial_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)
