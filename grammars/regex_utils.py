"""Regexes for the DSL's typed ``gen`` and the ``choices`` grammar kind.

Every regex here is in the subset that xgrammar's regex converter accepts (no lookaround, no
backreferences, no group flags) and is meant to be matched as a whole (``re.fullmatch``).
"""

from __future__ import annotations

INT_REGEX = r"-?(0|[1-9][0-9]*)"
"""A JSON-style integer: optional minus, no leading zeros."""

FLOAT_REGEX = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
"""A JSON-style number (integers included); parses with Python's ``float``."""

BOOL_REGEX = r"(True|False)"
"""A Python boolean literal."""

STRING_REGEX = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"'
"""A double-quoted string without control characters; escapes ``\\" \\\\ \\/ \\b \\f \\n \\r \\t``
(no ``\\uXXXX``), so the text is valid JSON and ``json.loads`` gives the content."""

_REGEX_META = frozenset("\\.^$|?*+()[]{}-/")


def escape_regex_literal(text: str) -> str:
    """Return a regex matching exactly ``text``: every regex metacharacter is backslash-escaped.

    Unlike ``re.escape`` it leaves spaces, quotes and other plain characters alone, so the result
    stays within xgrammar's regex dialect.
    """
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def choices_regex(choices: list[str]) -> str:
    """Return a regex whose full matches are exactly the strings in ``choices``.

    Raises ``ValueError`` if ``choices`` is empty or holds a non-string.
    """
    if not choices:
        raise ValueError("choices must be a non-empty list of strings")
    for c in choices:
        if not isinstance(c, str):
            raise ValueError(f"choices must be strings, got {type(c).__name__}: {c!r}")
    return "(" + "|".join(escape_regex_literal(c) for c in choices) + ")"
