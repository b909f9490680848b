"""Grammar backend tests on the default model's real tokenizer (SmolLM2, vocab 49152, EOS 2).

Random walks sample allowed tokens (seeded, biased towards closing punctuation and EOS so that
they end soon) and check that the text of every walk that terminates satisfies the spec.
"""

from __future__ import annotations

import ast
import json
import os
import re
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from radixflow.grammars import (
    BOOL_REGEX,
    FLOAT_REGEX,
    INT_REGEX,
    STRING_REGEX,
    GrammarCompileTimeout,
    GrammarError,
    XGrammarBackend,
    apply_bitmask_torch,
    choices_regex,
    jump_forward_tokens,
    unpack_bitmask,
    validate_grammar,
)

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Per-step ops on 49k-wide rows are ~10x slower with 2 threads on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok_path() -> str:
    from radixflow.runtime.loading.default_model import default_model_path

    return os.path.join(str(default_model_path()), "tokenizer.json")


@pytest.fixture(scope="session")
def tok(tok_path: str) -> Tokenizer:
    return Tokenizer.from_file(tok_path)


@pytest.fixture(scope="session")
def backend(tok_path: str) -> XGrammarBackend:
    b = XGrammarBackend(tok_path, VOCAB, [EOS])
    yield b
    b.shutdown()


@pytest.fixture(scope="session")
def closing_bias(tok: Tokenizer) -> torch.Tensor:
    """+4 for tokens holding a closing/separating character, +10 for EOS."""
    bias = torch.zeros(VOCAB)
    for i in range(VOCAB):
        s = tok.decode([i], skip_special_tokens=False)
        if any(c in s for c in '"}],'):
            bias[i] = 4.0
    bias[EOS] = 10.0
    return bias


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def random_walk(
    backend: XGrammarBackend,
    tok: Tokenizer,
    bias: torch.Tensor,
    kind: str,
    spec: str,
    seed: int,
    max_steps: int = 400,
    jump_forward: bool = False,
) -> tuple[str, list[int], int]:
    """Sample allowed tokens until the matcher terminates; return (text, ids, jump-forwards)."""
    m = backend.create_matcher(backend.get_compiled(backend.compile_async(kind, spec)))
    bitmask = backend.allocate_bitmask(1)
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    jumps = 0
    for _ in range(max_steps):
        m.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, VOCAB, generator=gen) + bias
        backend.apply_bitmask(logits, bitmask, None)
        assert torch.isfinite(logits).any(), "grammar allows no token"
        token = int(logits[0].argmax())  # Gaussian-noise argmax: a random allowed token
        assert m.accept_token(token)
        if m.is_terminated():
            assert token == EOS
            return decode(tok, ids), ids, jumps
        ids.append(token)
        forced = m.find_jump_forward_string() if jump_forward else ""
        if forced:
            assert m.accept_string(forced)
            k, new = jump_forward_tokens(ids, forced, lambda s: encode(tok, s), lambda t: decode(tok, t))
            ids = ids[: len(ids) - k] + new
            jumps += 1
    raise AssertionError(f"walk did not terminate in {max_steps} steps: {decode(tok, ids)!r}")


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                "required": ["street", "zip"],
            },
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "address", "tags"],
    },
    "enum_const_anyof": {
        "type": "object",
        "properties": {
            "status": {"enum": ["active", "inactive", "banned"]},
            "kind": {"const": "user"},
            "value": {"anyOf": [{"type": "integer"}, {"type": "boolean"}, {"type": "null"}]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["status", "kind", "value", "score"],
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {
            "origin": {"$ref": "#/$defs/point"},
            "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2, "maxItems": 2},
        },
        "required": ["origin", "path"],
    },
    "any_object": {},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_validate(backend, tok, closing_bias, name):
    schema = SCHEMAS[name]
    for seed in range(3):
        text, _, _ = random_walk(backend, tok, closing_bias, "json", json.dumps(schema), seed)
        value = json.loads(text)
        assert isinstance(value, dict)
        jsonschema.validate(value, schema)
        if name == "nested":
            assert re.fullmatch(r"[0-9]{5}", value["address"]["zip"])
            assert 1 <= len(value["tags"]) <= 3


REGEXES = {
    "ip": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "email": r"[a-z0-9._%+-]{1,10}@[a-z0-9-]{1,10}(\.[a-z0-9-]{1,8})*\.[a-z]{2,6}",
    "phone": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    "int": INT_REGEX,
    "float": FLOAT_REGEX,
    "bool": BOOL_REGEX,
    "string": STRING_REGEX,
}


@pytest.mark.parametrize("name", sorted(REGEXES))
def test_regex_walks_fullmatch(backend, tok, closing_bias, name):
    pattern = REGEXES[name]
    for seed in range(3):
        text, _, _ = random_walk(backend, tok, closing_bias, "regex", pattern, seed)
        assert re.fullmatch(pattern, text), text
        if name == "int":
            assert str(int(text)) == text
        elif name == "float":
            float(text)
        elif name == "string":
            assert isinstance(json.loads(text), str)


def test_choices_and_ebnf_walks(backend, tok, closing_bias):
    choices = ["yes", "no", "maybe so", "a.b|c (d)", "über"]
    for seed in range(6):
        text, _, _ = random_walk(backend, tok, closing_bias, "choices", json.dumps(choices), seed)
        assert text in choices
    ebnf = 'root ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" root ")"'
    for seed in range(3):
        text, _, _ = random_walk(backend, tok, closing_bias, "ebnf", ebnf, seed)
        assert re.fullmatch(r"[0-9()+-]+", text) and text.count("(") == text.count(")")
        eval(text)  # balanced arithmetic over integers


def test_choices_regex_escapes_metacharacters():
    choices = ["", "a.b", "x|y", "(p)", "[q]", "{r}", "1+2*3?", "a\\b", "^$", "a-b/c", ' "q" ']
    pattern = choices_regex(choices)
    assert all(re.fullmatch(pattern, c) for c in choices)
    assert not re.fullmatch(pattern, "axb") and not re.fullmatch(pattern, "x")
    with pytest.raises(ValueError):
        choices_regex([])


def test_jump_forward_strings(backend, tok):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "color": {"enum": ["blue", "black"]}},
        "required": ["name", "age", "color"],
    }
    m = backend.create_matcher(backend.get_compiled(backend.compile_async("json", json.dumps(schema))))
    # Compact layout (any_whitespace=False): the first key and the opening quote are forced.
    assert m.find_jump_forward_string() == '{"name": "'
    assert m.accept_string('{"name": "Al"')
    assert m.find_jump_forward_string() == ', "age": '
    assert m.accept_string(', "age": 7')
    assert m.find_jump_forward_string() == ""  # more digits or the next key
    assert m.accept_string(",")
    assert m.find_jump_forward_string() == ' "color": "bl'  # enum values share "bl"
    assert m.accept_string(' "color": "blue')
    assert m.find_jump_forward_string() == '"}'
    assert m.accept_string('"}')
    assert m.find_jump_forward_string() == "" and not m.is_terminated()
    assert m.accept_token(EOS) and m.is_terminated()


def test_any_whitespace_disables_key_jump_forward(tok_path):
    b = XGrammarBackend(tok_path, VOCAB, [EOS], any_whitespace=True)
    try:
        schema = '{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}'
        m = b.create_matcher(b.get_compiled(b.compile_async("json", schema)))
        assert m.find_jump_forward_string() == "{"
        assert m.accept_string("{")
        assert m.find_jump_forward_string() == ""  # whitespace may come first
        assert m.accept_string('\n  "name" : "x" \n}')
    finally:
        b.shutdown()


def test_jump_forward_walk_retokenizes(backend, tok):
    schema = {
        "type": "object",
        "properties": {
            "first_name": {"type": "string", "maxLength": 8},
            "last_name": {"type": "string", "maxLength": 8},
            "role": {"enum": ["administrator", "developer"]},
            "active": {"type": "boolean"},
        },
        "required": ["first_name", "last_name", "role", "active"],
    }
    spec = json.dumps(schema)
    bias = torch.zeros(VOCAB)
    bias[EOS] = 10.0
    bias[encode(tok, '"')[0]] = 6.0
    for seed in range(3):
        text, ids, jumps = random_walk(backend, tok, bias, "json", spec, seed, jump_forward=True)
        jsonschema.validate(json.loads(text), schema)
        assert jumps >= 4
        # The retokenized ids are themselves grammar-valid, token by token.
        fresh = backend.create_matcher(backend.get_compiled(backend.compile_async("json", spec)))
        assert all(fresh.accept_token(t) for t in ids + [EOS]) and fresh.is_terminated()


@pytest.mark.parametrize(
    ("prev", "forced"),
    [('{"', 'name": "'), ("{", '"name": "'), ("Hello wor", "ld!"), ("", '{"a'), ("é", "x"), ("a b", "")],
)
def test_jump_forward_tokens(tok, prev, forced):
    enc, dec = (lambda s: encode(tok, s)), (lambda ids: decode(tok, ids))
    out = enc(prev)
    k, new = jump_forward_tokens(out, forced, enc, dec)
    result = out[: len(out) - k] + new
    assert dec(result) == prev + forced
    assert result == enc(prev + forced)  # canonical tokenization at the boundary
    assert k == 0 or not new or new[0] != out[len(out) - k]
    if prev == "{":  # '{' + '"' merge into one token: the '{' token is replaced
        assert k == 1


def test_jump_forward_tokens_skips_partial_utf8(tok):
    enc, dec = (lambda s: encode(tok, s)), (lambda ids: decode(tok, ids))
    raw = tok.get_vocab()
    e_first = raw["Ã"]  # first byte (0xC3) of "é" as a byte-level token
    e_second = raw["©"]  # second byte (0xA9)
    k, new = jump_forward_tokens([e_first, e_second], "x", enc, dec, lookback=1)
    assert k == 0 and dec([e_first, e_second] + new) == "éx"


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("json", "{bad", "not valid JSON"),
        ("json", "[1, 2]", "must be a JSON object"),
        ("json", '{"type": "wat"}', 'Unsupported type "wat"'),
        ("json", '{"$ref": "#/$defs/missing"}', "$defs"),
        ("json", '{"type": "string", "pattern": "(?=a)b"}', "Lookahead"),
        ("regex", "(", "parenthesis is not closed"),
        ("regex", "(?=a)b", "Lookahead is not supported"),
        ("regex", r"\bword", "Word boundary"),
        ("regex", "[a-", "Unclosed"),
        ("ebnf", "root ::= ", "EBNF"),
        ("ebnf", 'expr ::= "a"', 'root rule with name "root" is not found'),
        ("ebnf", "root ::= undefined_rule", 'Rule "undefined_rule" is not defined'),
        ("choices", "[]", "non-empty"),
        ("choices", '["a", 3]', "must be strings"),
        ("choices", '{"a": 1}', "JSON list"),
        ("xml", "<a/>", "unknown grammar kind"),
    ],
)
def test_invalid_specs_raise(backend, kind, spec, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        validate_grammar(kind, spec)
    with pytest.raises(GrammarError, match=re.escape(message)):
        backend.validate(kind, spec)
    with pytest.raises(GrammarError, match=re.escape(message)):
        backend.get_compiled(backend.compile_async(kind, spec))


def test_compile_cache(backend):
    spec = '{"type": "object", "properties": {"cache_me": {"type": "integer"}}, "required": ["cache_me"]}'
    f1 = backend.compile_async("json", spec)
    f2 = backend.compile_async("json", spec)
    assert f1 is f2
    assert backend.get_compiled(f1) is backend.get_compiled(f2)
    assert backend.compile_async("regex", spec) is not f1  # kind is part of the key
    bad1 = backend.compile_async("regex", "(unclosed")
    with pytest.raises(GrammarError):
        backend.get_compiled(bad1)
    bad2 = backend.compile_async("regex", "(unclosed")
    assert bad2 is not bad1  # a failure is not served from the cache
    with pytest.raises(GrammarError):
        backend.get_compiled(bad2)


def test_compile_timeout(tok_path):
    release = threading.Event()

    class SlowBackend(XGrammarBackend):
        def _compile(self, kind, spec):
            release.wait(10)
            return super()._compile(kind, spec)

    b = SlowBackend(tok_path, VOCAB, [EOS], max_workers=1, compile_timeout=0.05)
    try:
        fut = b.compile_async("regex", "[0-9]+")
        with pytest.raises(GrammarCompileTimeout, match="longer than 0.05s"):
            b.get_compiled(fut)
        assert b.poll(fut, deadline=time.monotonic() + 60) is None
        with pytest.raises(GrammarCompileTimeout):
            b.poll(fut, deadline=time.monotonic() - 1)
        assert b.compile_async("regex", "[0-9]+") is fut  # still compiling: not resubmitted
        release.set()
        compiled = b.get_compiled(fut, timeout=10)
        assert b.poll(fut, deadline=time.monotonic() - 1) is compiled
    finally:
        release.set()
        b.shutdown()


def test_rollback_and_rejection_keep_state(backend, tok):
    schema = '{"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer"}}}}'
    m = backend.create_matcher(backend.get_compiled(backend.compile_async("json", schema)))
    masks = backend.allocate_bitmask(3)
    ids = encode(tok, '{"k": [12, 3')
    for t in ids[:3]:
        assert m.accept_token(t)
    m.fill_bitmask(masks, 0)
    jf = m.find_jump_forward_string()
    for t in ids[3:]:
        assert m.accept_token(t)
    assert not m.accept_token(encode(tok, "x")[0])  # rejected: state unchanged
    m.fill_bitmask(masks, 2)
    assert m.accept_string("]")
    m.rollback(1)  # undoes the accept_string
    m.fill_bitmask(masks, 1)
    assert torch.equal(masks[1], masks[2])
    m.rollback(len(ids) - 3)
    m.fill_bitmask(masks, 1)
    assert torch.equal(masks[0], masks[1]) and m.find_jump_forward_string() == jf
    m.reset()
    assert m.find_jump_forward_string() == "{"


def test_special_and_padding_tokens_never_allowed(tok_path, tok):
    vocab = VOCAB + 64  # model logits wider than the tokenizer
    b = XGrammarBackend(tok_path, vocab, [EOS])
    try:
        m = b.create_matcher(b.get_compiled(b.compile_async("regex", STRING_REGEX)))
        mask = b.allocate_bitmask(1)
        assert mask.shape == (1, (vocab + 31) // 32) and mask.dtype == torch.int32
        assert m.accept_string('"abc')
        m.fill_bitmask(mask, 0)
        allowed = unpack_bitmask(mask, vocab)[0]
        assert not allowed[:17].any()  # <|endoftext|>, <|im_start|>, <|im_end|>, ... inside a string
        assert not allowed[VOCAB:].any()
        assert allowed[encode(tok, "hello")[0]]
        assert m.accept_string('"')
        m.fill_bitmask(mask, 0)
        allowed = unpack_bitmask(mask, vocab)[0]
        assert allowed.nonzero().flatten().tolist() == [EOS]  # complete: only EOS ends it
    finally:
        b.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [VOCAB, 1000, 77])
def test_apply_bitmask_matches_torch_where(dtype, width):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, width, generator=gen).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (width + 31) // 32), dtype=torch.int32, generator=gen)
    bits = torch.tensor([[(int(w) >> j) & 1 for w in row for j in range(32)] for row in bitmask.tolist()])
    bits = bits[:, :width].bool()
    for rows in (None, torch.tensor([0, 3]), torch.tensor([4])):
        selected = torch.zeros(5, 1, dtype=torch.bool)
        selected[slice(None) if rows is None else rows] = True
        expected = torch.where(bits | ~selected, logits, torch.tensor(float("-inf"), dtype=dtype))
        for apply in (XGrammarBackend.apply_bitmask, apply_bitmask_torch):
            out = logits.clone()
            apply(out, bitmask, rows)
            assert torch.equal(out, expected), (apply, rows)


def test_tokenizer_info_detection(backend):
    info = backend.tokenizer_info
    assert info.vocab_type.name == "BYTE_LEVEL" and not info.add_prefix_space
    assert info.vocab_size == VOCAB and info.stop_token_ids == [EOS]


def test_grammars_package_does_not_import_runtime():
    pkg = Path(__import__("radixflow.grammars").grammars.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith(("radixflow.runtime", "runtime")) for n in names), path
