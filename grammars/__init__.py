"""Grammar-constrained decoding: compiled grammars, per-request matchers, token bitmasks.

Imports nothing from ``radixflow.runtime``; the scheduler and sampler use it through
:class:`GrammarBackend` / :class:`GrammarMatcher`.
"""

from radixflow.grammars.base import (
    GRAMMAR_KINDS,
    GrammarBackend,
    GrammarMatcher,
    apply_bitmask_torch,
    unpack_bitmask,
)
from radixflow.grammars.errors import GrammarCompileTimeout, GrammarError
from radixflow.grammars.jump_forward import jump_forward_tokens
from radixflow.grammars.regex_utils import (
    BOOL_REGEX,
    FLOAT_REGEX,
    INT_REGEX,
    STRING_REGEX,
    choices_regex,
    escape_regex_literal,
)
from radixflow.grammars.xgrammar_backend import (
    XGrammarBackend,
    XGrammarMatcher,
    load_tokenizer_info,
    validate_grammar,
)

__all__ = [
    "BOOL_REGEX",
    "FLOAT_REGEX",
    "GRAMMAR_KINDS",
    "INT_REGEX",
    "STRING_REGEX",
    "GrammarBackend",
    "GrammarCompileTimeout",
    "GrammarError",
    "GrammarMatcher",
    "XGrammarBackend",
    "XGrammarMatcher",
    "apply_bitmask_torch",
    "choices_regex",
    "escape_regex_literal",
    "jump_forward_tokens",
    "load_tokenizer_info",
    "unpack_bitmask",
    "validate_grammar",
]
