"""Grammar backend on llguidance: specs -> llguidance grammar text -> ``LLMatcher`` per request.

Same contract as :mod:`radixflow.grammars.xgrammar_backend` (see ``grammars/base.py``):

- JSON schemas compile to the same compact layout (``", "`` and ``": "`` separators, no other
  whitespace) unless ``any_whitespace``; they compile *leniently*: keywords llguidance does not
  implement are dropped with a warning instead of an error. Whether that is acceptable for a
  request is decided before compiling (:mod:`radixflow.grammars.schema_support`), from the same
  warnings (:func:`llguidance_support`).
- Regexes, GBNF grammars (converted to Lark by llguidance's ``gbnf_to_lark``), choices, and
  SGLang's ``structural_tag`` (``structures`` + ``triggers``) are supported; xgrammar's
  ``{"format": ...}`` structural tags are not.
- Masks are written into the shared int32 bitmask; a batch of llguidance rows is filled by one
  ``LLExecutor`` call. A matcher terminates only by accepting a stop token once complete.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import torch
from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from radixflow.grammars.base import GRAMMAR_KINDS, GrammarBackend, GrammarMatcher
from radixflow.grammars.errors import GrammarError
from radixflow.grammars.regex_utils import choices_regex
from radixflow.grammars.schema_support import Support, llguidance_gaps, parse_schema


def _json_options(any_whitespace: bool) -> dict[str, Any]:
    if any_whitespace:
        return {"whitespace_flexible": True, "lenient": True}
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def _structural_tag(spec: str) -> str:
    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"structural_tag is not valid JSON: {e}") from None
    if not isinstance(tag, dict) or not isinstance(tag.get("structures"), list) or not tag["structures"]:
        raise GrammarError('llguidance supports structural_tag only as {"structures": [...], "triggers": [...]}')
    triggers = tag.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise GrammarError("structural_tag needs a non-empty list of non-empty trigger strings")
    tags = []
    for s in tag["structures"]:
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("begin", "end")):
            raise GrammarError("invalid structural_tag: each structure needs begin and end strings and a schema")
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise GrammarError(f"invalid structural_tag: no trigger starts the begin {s['begin']!r}")
        schema = s.get("schema", s.get("parameters"))
        tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], end=s["end"],
                                         grammar=schema if isinstance(schema, dict) else {}))
    return llguidance.StructTag.to_grammar(tags, assume_special=False)  # triggers are matched as text


def to_llguidance(kind: str, spec: str, any_whitespace: bool = False) -> str:
    """``(kind, spec)`` as llguidance grammar text, checked (no tokenizer needed).

    Raises :class:`GrammarError` naming the problem.
    """
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")
    if not isinstance(spec, str):
        raise GrammarError(f"{kind} spec must be a string, got {type(spec).__name__}")
    grammar = _grammar_text(kind, spec, any_whitespace)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"invalid or unsupported {kind} (llguidance): {messages[0].strip()}")
    return grammar


def _grammar_text(kind: str, spec: str, any_whitespace: bool) -> str:
    try:
        if kind == "json":
            schema = parse_schema(spec)
            if not isinstance(schema, dict):
                raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
            return LLMatcher.grammar_from_json_schema(spec, defaults=_json_options(any_whitespace))
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec)
        if kind == "ebnf":
            return LLMatcher.grammar_from_lark(_gbnf_to_lark(spec))
        if kind == "structural_tag":
            return _structural_tag(spec)
        choices = json.loads(spec)
        if not isinstance(choices, list):
            raise GrammarError(f"choices must be a JSON list of strings, got {type(choices).__name__}")
        return LLMatcher.grammar_from_regex(choices_regex(choices))
    except GrammarError:
        raise
    except json.JSONDecodeError as e:
        raise GrammarError(f"{'json_schema' if kind == 'json' else kind} is not valid JSON: {e}") from None
    except RecursionError:
        raise GrammarError(f"{kind} spec nests too deeply") from None
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:  # converters' own checks
        raise GrammarError(f"invalid {kind} spec (llguidance): {e}") from None


def _gbnf_to_lark(spec: str) -> str:
    try:
        return any_to_lark(spec)
    except Exception as e:  # llguidance's converter raises bare Exceptions for bad grammars
        raise GrammarError(f"invalid EBNF grammar (llguidance): {e}") from None


@functools.lru_cache(maxsize=256)
def llguidance_support(spec: str, any_whitespace: bool = False) -> Support:
    """What llguidance does with the JSON schema ``spec``: its compile error, or the keywords it
    drops (from its own lenient-compile warnings), located in the schema."""
    try:
        grammar = _grammar_text("json", spec, any_whitespace)
    except GrammarError as e:
        return Support("llguidance", error=str(e))
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        return Support("llguidance", error=f"invalid or unsupported json_schema (llguidance): {messages[0].strip()}")
    gaps, approx = llguidance_gaps(parse_schema(spec), messages)
    return Support("llguidance", not_enforced=tuple(gaps), approximated=tuple(approx))


class LLGuidanceMatcher(GrammarMatcher):
    """:class:`GrammarMatcher` over ``llguidance.LLMatcher`` (rollback by accept steps)."""

    def __init__(self, matcher: LLMatcher, tokenizer: llguidance.LLTokenizer, stop_ids: frozenset[int]) -> None:
        self._m = matcher
        self._tok = tokenizer
        self._stop_ids = stop_ids
        self._steps: list[int] = []  # tokens consumed by each accept step
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        if self._terminated:
            return False
        is_stop = token_id in self._stop_ids
        if is_stop and self._m.is_stopped():
            self._steps.append(0)  # llguidance does not count a stop token once it has stopped
            self._terminated = True
            return True
        if is_stop and not self._m.is_accepting():
            return False
        if self._m.try_consume_tokens([token_id]) != 1:  # a rejected token leaves the state as it was
            return False
        self._steps.append(1)
        self._terminated = is_stop
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """See :meth:`GrammarMatcher.fill_bitmask`; always True (see :func:`_dead_end_or_error`)."""
        base, row_bytes, rows = _mask_address(bitmask)
        if not 0 <= row < rows:
            raise ValueError(f"bitmask row {row} out of range for {rows} rows")
        self._m.unsafe_compute_mask_ptr(base + row * row_bytes, row_bytes)
        if self._m.is_error():
            raise _dead_end_or_error(self._m)
        return True

    def is_terminated(self) -> bool:
        return self._terminated

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= len(self._steps):
            raise ValueError(f"cannot roll back {num_tokens} steps; {len(self._steps)} were taken")
        steps = self._steps[len(self._steps) - num_tokens:]
        del self._steps[len(self._steps) - num_tokens:]
        if steps:
            self._m.rollback(sum(steps))
            self._terminated = False

    def find_jump_forward_string(self) -> str:
        """Forced bytes cut to whole UTF-8 characters ("" when none)."""
        if self._terminated:
            return ""
        forced = self._m.compute_ff_bytes()
        for cut in range(len(forced), max(len(forced) - 4, -1), -1):
            try:
                return forced[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return ""

    def accept_string(self, text: str) -> bool:
        tokens = self._tok.tokenize_str(text)
        if self._terminated or not tokens:
            return False
        taken = self._m.try_consume_tokens(tokens)
        if taken != len(tokens):
            self._m.rollback(taken)
            return False
        self._steps.append(len(tokens))
        return True

    def reset(self) -> None:
        self._m.reset()
        self._steps.clear()
        self._terminated = False

    def is_completed(self) -> bool:
        """True if the text accepted so far is a complete match (a stop token may come next)."""
        return self._m.is_accepting()


class LLGuidanceBackend(GrammarBackend):
    """:class:`GrammarBackend` on llguidance. ``any_whitespace`` as for xgrammar."""

    name = "llguidance"

    def __init__(self, tokenizer_json_path: str, vocab_size: int, stop_token_ids: list[int], max_workers: int = 2,
                 compile_timeout: float = 30.0, cache_size: int = 512, any_whitespace: bool = False) -> None:
        super().__init__(tokenizer_json_path, vocab_size, stop_token_ids, max_workers, compile_timeout, cache_size)
        self.any_whitespace = any_whitespace
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json_path, n_vocab=vocab_size, eos_token=list(stop_token_ids))
        self._stop_ids = frozenset(stop_token_ids)
        self._executor = llguidance.LLExecutor(num_threads=max_workers)

    def validate(self, kind: str, spec: str) -> None:
        to_llguidance(kind, spec, self.any_whitespace)

    def _compile(self, kind: str, spec: str) -> str:
        grammar = to_llguidance(kind, spec, self.any_whitespace)
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)  # builds the lexer: the slow part
        if matcher.is_error():
            raise GrammarError(f"cannot compile {kind} grammar (llguidance): {matcher.get_error()}")
        return matcher

    def create_matcher(self, compiled: LLMatcher) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(compiled.deep_copy(), self.tokenizer, self._stop_ids)

    def fill_bitmasks(self, items: list[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> tuple[list[int], dict]:
        """As :meth:`GrammarBackend.fill_bitmasks`: the mask is checked once, one row is filled on
        this thread, more in one ``LLExecutor`` call (its threads). Every row filled without error
        needs the mask (see :func:`_dead_end_or_error`). Raises ValueError for a bad mask or row."""
        base, row_bytes, rows = _mask_address(bitmask)
        if len(items) == 1:  # the common decode case; a hand-off to the executor's threads costs more
            (matcher, row), = items
            if not 0 <= row < rows:
                raise ValueError(f"bitmask row {row} out of range for {rows} rows")
            m = matcher._m
            m.unsafe_compute_mask_ptr(base + row * row_bytes, row_bytes)
            return ([], {row: _dead_end_or_error(m)}) if m.is_error() else ([row], {})
        if not all(0 <= row < rows for _, row in items):
            raise ValueError(f"bitmask rows {[row for _, row in items]} out of range for {rows} rows")
        self._executor.unsafe_compute_mask_ptr([(m._m, row) for m, row in items], base, row_bytes, rows)
        used, failed = [], {}
        for m, row in items:
            if m._m.is_error():
                failed[row] = _dead_end_or_error(m._m)
            else:
                used.append(row)
        return used, failed


def _mask_address(bitmask: torch.Tensor) -> tuple[int, int, int]:
    """(address, bytes per row, rows) of ``bitmask`` for llguidance's pointer API, which checks the
    row size against the vocabulary itself. Raises ValueError for a mask it must not write to."""
    shape = bitmask.shape  # read once: each tensor attribute costs ~0.1 us, and this runs per token
    if not (bitmask.dtype is torch.int32 and bitmask.is_cpu and len(shape) == 2 and bitmask.is_contiguous()):
        raise ValueError(f"bitmask must be a contiguous 2-D int32 CPU tensor, got {bitmask.dtype} "
                         f"{tuple(shape)} on {bitmask.device}")
    return bitmask.data_ptr(), shape[1] * 4, shape[0]


def _dead_end_or_error(matcher: LLMatcher) -> RuntimeError:
    """The error of a matcher that llguidance put in its error state while computing a mask.

    This is how a dead end shows: llguidance never returns an empty mask; when no token can
    continue the text it stops with ``NoExtensionBias`` and the row fails (the request is aborted
    with this message). So a mask filled without error allows at least one token, and callers
    need not scan it; it is always applied (a mask that happens to allow every token is a no-op).
    """
    first = (matcher.get_error().splitlines() or [str(matcher.stop_reason())])[0]  # the rest is a state dump
    if first == "NoExtensionBias":
        return RuntimeError("llguidance: dead end: the grammar allows no next token")
    return RuntimeError(f"llguidance: {first}")
