"""Grammar backend on xgrammar: specs -> ``xgr.Grammar`` -> ``CompiledGrammar`` -> matchers.

xgrammar behaviour this module relies on (checked in ``tests/test_grammars.py``):

- JSON schemas compile with ``any_whitespace=False`` by default: output is compact with
  ``", "`` and ``": "`` separators, e.g. ``{"name": "Ann", "age": 3}``. That keeps a small
  model from looping on whitespace and makes keys jump-forwardable (from the start state of
  ``{"properties": {"name": {"type": "string"}}, "required": ["name"]}`` the forced text is
  ``{"name": "``). With ``any_whitespace=True`` whitespace is allowed between tokens and the
  forced text after ``{`` is empty.
- ``strict_mode`` is on: properties not listed are forbidden unless ``additionalProperties``
  allows them; ``{}`` and ``{"type": "object"}`` compile to "any JSON object".
- A matcher terminates only by accepting a stop token once the grammar is complete; the
  bitmask of a complete grammar allows exactly the stop tokens (and more text if the grammar
  can continue).
- Special added tokens of the tokenizer (``<|im_start|>`` ...) are never allowed inside a
  grammar; ids in ``[len(tokenizer vocab), vocab_size)`` neither.
"""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.parse
import warnings
from typing import Any

import torch
import xgrammar as xgr

from radixflow.grammars.base import GRAMMAR_KINDS, GrammarBackend, GrammarMatcher, apply_bitmask_torch
from radixflow.grammars.errors import GrammarError
from radixflow.grammars.regex_utils import choices_regex

_ANNOTATION_KEYS = frozenset({"title", "description", "$schema", "$id", "$comment", "examples"})
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _xgr_message(err: Exception) -> str:
    """xgrammar's error text without its ``[time] file.cc:line:`` log prefix."""
    return _LOG_PREFIX.sub("", str(err).strip())


def _check_regex(pattern: str, what: str) -> xgr.Grammar:
    try:
        return xgr.Grammar.from_regex(pattern)
    except RuntimeError as e:
        raise GrammarError(f"invalid or unsupported {what} {pattern!r}: {_xgr_message(e)}") from None


def _check_schema_patterns(node: Any) -> None:
    """xgrammar ignores (with a log warning) unsupported syntax inside ``pattern``; reject it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                _check_regex(value, "json_schema pattern")
            else:
                _check_schema_patterns(value)
    elif isinstance(node, list):
        for item in node:
            _check_schema_patterns(item)


def _check_refs(node: Any, root: dict[str, Any]) -> None:
    """Raise GrammarError for a `$ref` that does not resolve inside the schema itself: remote
    references are never fetched, and xgrammar would otherwise drop them silently."""
    if isinstance(node, list):
        for item in node:
            _check_refs(item, root)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if ref is not None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise GrammarError(f"json_schema $ref {ref!r} is not supported: only references within the schema "
                               "('#' or '#/...') are resolved; remote references are not fetched")
        target: Any = root
        pointer = urllib.parse.unquote(ref[1:])  # a URI fragment is percent-encoded (RFC 6901, section 6)
        for part in pointer[1:].split("/") if pointer else []:
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise GrammarError(f"json_schema $ref {ref!r} does not resolve: no {key!r} in the schema")
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # names -> schemas (a property may be called "enum")
            for sub in value.values():
                _check_refs(sub, root)
        elif key not in ("enum", "const", "default", "examples"):  # literal values, not schemas
            _check_refs(value, root)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _json_schema_grammar(spec: str, any_whitespace: bool) -> xgr.Grammar:
    try:
        schema = json.loads(spec)
        if not isinstance(schema, dict):
            raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
        _check_schema_patterns(schema)
        _check_refs(schema, schema)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from None
    except RecursionError:  # json.loads and the checks recurse once per level
        raise GrammarError("json_schema nests too deeply") from None
    core = {k: v for k, v in schema.items() if k not in _ANNOTATION_KEYS}
    if core in ({}, {"type": "object"}):
        spec = '{"type": "object"}'  # any JSON object (json_object mode)
    try:
        return xgr.Grammar.from_json_schema(spec, any_whitespace=any_whitespace, strict_mode=True)
    except RuntimeError as e:
        raise GrammarError(f"invalid or unsupported json_schema: {_xgr_message(e)}") from None


def _structural_tag_grammar(spec: str) -> xgr.Grammar:
    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"structural_tag is not valid JSON: {e}") from None
    if not isinstance(tag, dict) or ("structures" in tag) == ("format" in tag):
        raise GrammarError('structural_tag must be a JSON object with "structures" and "triggers", or with "format"')
    for item in tag.get("structures") or ():
        schema = item.get("schema", item.get("parameters")) if isinstance(item, dict) else None
        if isinstance(schema, dict):
            _check_refs(schema, schema)
    try:
        if "format" in tag:
            return xgr.Grammar.from_structural_tag({"type": "structural_tag", "format": tag["format"]})
        structures, triggers = tag["structures"], tag.get("triggers")
        if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
            raise GrammarError("structural_tag needs a non-empty list of structures and a non-empty list of triggers")
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=s.get("schema", s.get("parameters")), end=s["end"])
                 for s in structures]
        with warnings.catch_warnings():  # the (structures, triggers) form is SGLang's; xgrammar calls it legacy
            warnings.simplefilter("ignore", DeprecationWarning)
            return xgr.Grammar.from_structural_tag(items, triggers)
    except GrammarError:
        raise
    except KeyError as e:
        raise GrammarError(f"invalid structural_tag: a structure needs begin, schema and end (missing {e})") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise GrammarError(f"invalid structural_tag: {_xgr_message(e)}") from None


def to_xgrammar(kind: str, spec: str, any_whitespace: bool = False) -> xgr.Grammar:
    """Parse ``(kind, spec)`` into an xgrammar ``Grammar`` (fast; no tokenizer needed).

    Raises :class:`GrammarError` with the reason (and position, where xgrammar gives one).
    """
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")
    if not isinstance(spec, str):
        raise GrammarError(f"{kind} spec must be a string, got {type(spec).__name__}")
    if kind == "json":
        return _json_schema_grammar(spec, any_whitespace)
    if kind == "regex":
        return _check_regex(spec, "regex")
    if kind == "structural_tag":
        return _structural_tag_grammar(spec)
    if kind == "ebnf":
        try:
            return xgr.Grammar.from_ebnf(spec)
        except RuntimeError as e:
            raise GrammarError(f"invalid EBNF grammar: {_xgr_message(e)}") from None
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"choices is not valid JSON: {e}") from None
    if not isinstance(choices, list):
        raise GrammarError(f"choices must be a JSON list of strings, got {type(choices).__name__}")
    try:
        return _check_regex(choices_regex(choices), "choices regex")
    except ValueError as e:
        raise GrammarError(str(e)) from None


def validate_grammar(kind: str, spec: str) -> None:
    """Raise :class:`GrammarError` if ``(kind, spec)`` is not a usable grammar (no compile)."""
    to_xgrammar(kind, spec)


def load_tokenizer_info(tokenizer_json_path: str, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """Build xgrammar's ``TokenizerInfo`` from a ``tokenizer.json`` (no transformers needed).

    The vocabulary type comes from the decoder (ByteLevel / ByteFallback, else a vocabulary
    check), ``add_prefix_space`` from encoding ``"a"``. Special added tokens become empty
    entries, which xgrammar treats as never-allowed special tokens.
    """
    from tokenizers import Tokenizer

    with open(tokenizer_json_path, encoding="utf-8") as f:
        tok_json = json.load(f)
    tokenizer = Tokenizer.from_file(tokenizer_json_path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    encoded: list[str] = [""] * vocab_size
    for token, idx in vocab.items():
        if idx < vocab_size:
            encoded[idx] = token
    for added in tok_json.get("added_tokens", []):
        if added.get("special") and added["id"] < vocab_size:
            encoded[added["id"]] = ""

    decoder = tok_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts if p}
    if "ByteLevel" in types:
        vocab_type, space = xgr.VocabType.BYTE_LEVEL, "Ġ"
    elif "ByteFallback" in types or sum(f"<0x{b:02X}>" in vocab for b in range(256)) >= 128:
        vocab_type, space = xgr.VocabType.BYTE_FALLBACK, "▁"
    else:
        vocab_type, space = xgr.VocabType.RAW, None
    first = tokenizer.encode("a", add_special_tokens=False).tokens
    add_prefix_space = bool(space and first and first[0].startswith(space))
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=add_prefix_space,
    )


class XGrammarMatcher(GrammarMatcher):
    """:class:`GrammarMatcher` over ``xgr.GrammarMatcher`` (unlimited rollback)."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._m = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        return self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def is_completed(self) -> bool:
        """True if the text accepted so far is a complete match (a stop token may come next)."""
        return self._m.is_completed()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def find_jump_forward_string(self) -> str:
        """See :meth:`GrammarMatcher.find_jump_forward_string`.

        Returns "" when the forced bytes do not form whole UTF-8 characters (e.g. two choices
        that share only the first byte of a character).
        """
        try:
            return self._m.find_jump_forward_string()
        except UnicodeDecodeError:
            return ""

    def accept_string(self, text: str) -> bool:
        return self._m.accept_string(text)

    def reset(self) -> None:
        self._m.reset()


class XGrammarBackend(GrammarBackend):
    """:class:`GrammarBackend` on xgrammar.

    Extra args: ``any_whitespace`` (JSON only): allow arbitrary whitespace between JSON tokens
    instead of the compact ``", "`` / ``": "`` layout.
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        vocab_size: int,
        stop_token_ids: list[int],
        max_workers: int = 2,
        compile_timeout: float = 30.0,
        cache_size: int = 512,
        any_whitespace: bool = False,
    ) -> None:
        super().__init__(tokenizer_json_path, vocab_size, stop_token_ids, max_workers, compile_timeout, cache_size)
        self.any_whitespace = any_whitespace
        self.tokenizer_info = load_tokenizer_info(tokenizer_json_path, vocab_size, stop_token_ids)
        # Our own LRU cache replaces xgrammar's (which would pin every grammar ever compiled).
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_workers, cache_enabled=False)

    def validate(self, kind: str, spec: str) -> None:
        to_xgrammar(kind, spec, self.any_whitespace)

    def _compile(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        grammar = to_xgrammar(kind, spec, self.any_whitespace)
        try:
            return self._compiler.compile_grammar(grammar)
        except RuntimeError as e:
            raise GrammarError(f"cannot compile {kind} grammar: {_xgr_message(e)}") from None

    def create_matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)

    @staticmethod
    def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                      rows: torch.Tensor | list[int] | None = None) -> None:
        """As :meth:`GrammarBackend.apply_bitmask`; xgrammar's kernel on CPU (fp32/bf16/fp16)
        and on CUDA with Triton installed, the PyTorch implementation elsewhere."""
        assert logits.dim() == 2 and bitmask.dim() == 2, (logits.shape, bitmask.shape)
        assert bitmask.shape[1] * 32 >= logits.shape[1], (bitmask.shape, logits.shape)
        dev = logits.device.type
        if logits.stride(1) != 1:  # xgrammar's kernels assume each row is contiguous
            apply_bitmask_torch(logits, bitmask, rows)
        elif (dev == "cpu" and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)) or (
            dev == "cuda" and _HAS_TRITON
        ):
            indices = rows if rows is None or isinstance(rows, list) else torch.as_tensor(rows).tolist()
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=indices)
        else:
            apply_bitmask_torch(logits, bitmask, rows)
