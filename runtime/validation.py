"""Checks on raw request input that are not about sampling parameters: text that is valid
Unicode, and JSON whose nesting is bounded before anything parses it recursively.

Each check raises ValueError with a message that names the offending field; the HTTP layer
turns it into a 400, the in-process Engine raises it as is.
"""

from __future__ import annotations

import re

import numpy as np

MAX_JSON_DEPTH = 128  # deeper than any real request or JSON schema; json.loads recurses per level

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def check_text(text: str, field: str) -> None:
    """Raise ValueError naming `field` if `text` is not valid Unicode (e.g. a lone surrogate
    such as "\\ud800", which JSON can escape but UTF-8 cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field} is not valid Unicode: {e.reason} at position {e.start} "
                         f"({text[e.start:e.end]!a})") from None


def check_strings(value: object, field: str) -> None:
    """check_text on every string in a JSON-like value (strings, lists, dict keys and values),
    at any depth (no recursion: an in-process caller's value is not depth-checked)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            check_text(v, field)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())


def check_token_ids(ids: object, field: str) -> None:
    """Raise ValueError naming `field` unless `ids` is a list (or tuple) of ints (bools and floats such as
    2.5 are not token ids). Whether each id is within the vocabulary is the scheduler's check."""
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{field} must be a list of token ids, got {type(ids).__name__}")
    bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
    if bad is not None:
        raise ValueError(f"{field} must be a list of token ids (integers), got a {type(bad).__name__}")


def check_logprob_args(logprob_start_len: object, top_logprobs_num: object, max_top_logprobs: int) -> None:
    """Raise ValueError naming the argument unless logprob_start_len is an int >= -1 and
    top_logprobs_num an int in [0, max_top_logprobs]."""
    if not isinstance(logprob_start_len, int) or isinstance(logprob_start_len, bool) or logprob_start_len < -1:
        raise ValueError("logprob_start_len must be an integer >= -1")
    if (not isinstance(top_logprobs_num, int) or isinstance(top_logprobs_num, bool)
            or not 0 <= top_logprobs_num <= max_top_logprobs):
        raise ValueError(f"top_logprobs_num must be an integer in [0, {max_top_logprobs}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings are skipped), without
    parsing it: linear time, no recursion, fast on megabytes."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def check_json_nesting(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise ValueError if the JSON text `raw` nests arrays/objects deeper than `max_depth`."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise ValueError(f"the request body nests {depth} levels deep; at most {max_depth} are accepted")
