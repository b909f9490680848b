"""Typed exceptions of the grammar package (one module, so callers can catch precisely)."""

from __future__ import annotations


class GrammarError(ValueError):
    """A grammar spec (JSON schema, regex, EBNF, choices) is invalid or unsupported.

    The message names the spec kind and the reason; it is safe to return to a client as a 400.
    """


class GrammarCompileTimeout(GrammarError):
    """Compiling a grammar took longer than the backend's ``compile_timeout``."""
