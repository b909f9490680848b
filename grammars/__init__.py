"""Grammar-constrained decoding: compiled grammars, per-request matchers, token bitmasks.

Two backends behind one interface (xgrammar, llguidance); `selection.choose_backend` picks the one
that enforces a request's spec exactly; `output_check` checks the finished text against the spec.

Imports nothing from ``radixflow.runtime``; the scheduler and sampler use it through
:class:`GrammarBackend` / :class:`GrammarMatcher`.
"""

import importlib
from typing import Any

# Lazy: `radixflow.grammars.regex_utils` (used by the DSL) must not pay for torch + xgrammar.
_EXPORTS = {
    "GRAMMAR_KINDS": "base", "GrammarBackend": "base", "GrammarMatcher": "base",
    "apply_bitmask_torch": "base", "unpack_bitmask": "base",
    "GrammarCompileTimeout": "errors", "GrammarError": "errors",
    "jump_forward_tokens": "jump_forward",
    "BOOL_REGEX": "regex_utils", "FLOAT_REGEX": "regex_utils", "INT_REGEX": "regex_utils",
    "STRING_REGEX": "regex_utils", "choices_regex": "regex_utils", "escape_regex_literal": "regex_utils",
    "XGrammarBackend": "xgrammar_backend", "XGrammarMatcher": "xgrammar_backend",
    "LLGuidanceBackend": "llguidance_backend", "LLGuidanceMatcher": "llguidance_backend",
    "GRAMMAR_BACKENDS": "selection", "BackendChoice": "selection", "choose_backend": "selection",
    "Support": "schema_support", "grammar_report": "output_check",
    "load_tokenizer_info": "xgrammar_backend", "validate_grammar": "xgrammar_backend",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"radixflow.grammars.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'radixflow.grammars' has no attribute {name!r}")


__all__ = [
    "BOOL_REGEX",
    "FLOAT_REGEX",
    "GRAMMAR_BACKENDS",
    "GRAMMAR_KINDS",
    "INT_REGEX",
    "STRING_REGEX",
    "BackendChoice",
    "GrammarBackend",
    "GrammarCompileTimeout",
    "GrammarError",
    "GrammarMatcher",
    "LLGuidanceBackend",
    "LLGuidanceMatcher",
    "Support",
    "XGrammarBackend",
    "XGrammarMatcher",
    "apply_bitmask_torch",
    "choices_regex",
    "choose_backend",
    "escape_regex_literal",
    "grammar_report",
    "jump_forward_tokens",
    "load_tokenizer_info",
    "unpack_bitmask",
    "validate_grammar",
]
