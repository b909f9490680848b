"""Structured outputs you can trust: what each grammar backend enforces, the strict policy, `auto`
routing, llguidance behind the shared interface, and the validation report on every output.

The checked list of xgrammar's gaps (grammars/schema_support.py) is shown here entry by entry:
xgrammar's own matcher accepts an instance the schema forbids. Keywords claimed as enforced are
shown the other way: the matcher rejects the violating instance.
"""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from radixflow.grammars import GrammarError, XGrammarBackend
from radixflow.grammars.base import apply_bitmask_torch
from radixflow.grammars.llguidance_backend import LLGuidanceBackend, llguidance_support
from radixflow.grammars.output_check import grammar_report
from radixflow.grammars.selection import choose_backend, xgrammar_support
from radixflow.runtime.engine import GenerationError

VOCAB = 49152
EOS = 2

# The shape of check-jsonschema's dependabot schema: `allOf` beside `properties` and
# `additionalProperties: false` at the top level (without its uniqueItems, which no backend enforces).
DEPENDABOT = {
    "type": "object", "additionalProperties": False, "required": ["version", "updates"],
    "properties": {
        "version": {"type": "integer", "const": 2},
        "updates": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["package-ecosystem", "directory"],
            "properties": {"package-ecosystem": {"enum": ["pip", "npm", "docker"]},
                           "directory": {"type": "string", "maxLength": 16}}}}},
    "allOf": [{"required": ["version"]}],
}
UNIQUE = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "uniqueItems": True,
          "minItems": 3, "maxItems": 5}

# keyword xgrammar does not enforce: (schema, an instance it accepts that the schema forbids)
XGRAMMAR_GAPS = {
    "allOf": (DEPENDABOT, {", ": 227.57}),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}, 5),
    "if": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
            "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, {"a": 1}),
    "not": ({"type": "integer", "not": {"const": 3}}, 3),
    "uniqueItems": (UNIQUE, [1, 1, 1]),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, [1]),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1}),
    "beside $ref": ({"$ref": "#/$defs/s", "maxLength": 2, "$defs": {"s": {"type": "string"}}}, "abcd"),
    "enum": ({"type": "string", "enum": ["a", 3]}, 3),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "z"]}, {"a": 1}),
}
# keyword xgrammar enforces: (schema, an instance it must reject)
XGRAMMAR_ENFORCED = {
    "patternProperties": ({"type": "object", "patternProperties": {"^x-": {"type": "integer"}},
                           "additionalProperties": False}, {"y": 1}),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, 4),
    "minimum": ({"type": "number", "minimum": 3}, 1.5),
    "maxLength": ({"type": "string", "maxLength": 3}, "abcd"),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"A": 1}),
    "recursive $ref": ({"$ref": "#/$defs/n", "$defs": {"n": {
        "type": "object", "additionalProperties": False, "required": ["v"],
        "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}},
        {"v": 1, "kids": [{"kids": []}]}),
    "disjoint oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, None),
}


@pytest.fixture(scope="module")
def tok_path() -> str:
    from radixflow.runtime.loading.default_model import default_model_path

    return os.path.join(str(default_model_path()), "tokenizer.json")


@pytest.fixture(scope="module")
def backends(tok_path: str):
    xgr, llg = XGrammarBackend(tok_path, VOCAB, [EOS]), LLGuidanceBackend(tok_path, VOCAB, [EOS])
    yield {"xgrammar": xgr, "llguidance": llg}
    xgr.shutdown()
    llg.shutdown()


def matcher_accepts(backend, schema: dict, instance) -> bool:
    """Whether the backend's matcher takes `instance` (compact JSON) and then EOS."""
    m = backend.create_matcher(backend.get_compiled(backend.compile_async("json", json.dumps(schema))))
    text = json.dumps(instance, separators=(", ", ": "))
    return m.accept_string(text) and m.accept_token(EOS) and m.is_terminated()


@pytest.mark.parametrize("keyword", XGRAMMAR_GAPS)
def test_xgrammar_gap_is_real_and_reported(backends, keyword):
    schema, bad = XGRAMMAR_GAPS[keyword]
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
    assert matcher_accepts(backends["xgrammar"], schema, bad), f"xgrammar now enforces {keyword}: update the list"
    s = xgrammar_support(json.dumps(schema))
    assert not s.exact and any(keyword in gap for gap in s.not_enforced), s


@pytest.mark.parametrize("keyword", XGRAMMAR_ENFORCED)
def test_xgrammar_enforced_keyword_is_exact(backends, keyword):
    schema, bad = XGRAMMAR_ENFORCED[keyword]
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
    assert not matcher_accepts(backends["xgrammar"], schema, bad)
    assert xgrammar_support(json.dumps(schema)).exact


def test_dependabot_case_llguidance_rejects_the_forbidden_key(backends):
    """The issue's case: xgrammar accepts {", ": 227.57}; llguidance enforces the schema exactly."""
    assert matcher_accepts(backends["xgrammar"], DEPENDABOT, {", ": 227.57})
    assert not matcher_accepts(backends["llguidance"], DEPENDABOT, {", ": 227.57})
    good = {"version": 2, "updates": [{"package-ecosystem": "pip", "directory": "/"}]}
    assert matcher_accepts(backends["llguidance"], DEPENDABOT, good)
    assert llguidance_support(json.dumps(DEPENDABOT)).exact


def test_llguidance_reports_what_it_drops():
    s = llguidance_support(json.dumps({"type": "object", "properties": {"tags": UNIQUE}}))
    assert s.not_enforced == ("uniqueItems at #/properties/tags",)


def test_auto_routes_to_the_exact_backend_and_strict_refuses_the_rest():
    assert choose_backend("json", json.dumps(XGRAMMAR_ENFORCED["multipleOf"][0])).backend == "xgrammar"
    choice = choose_backend("json", json.dumps(DEPENDABOT))
    assert (choice.backend, choice.exact) == ("llguidance", True)
    with pytest.raises(GrammarError, match=re.escape("the xgrammar grammar backend does not enforce")) as e:
        choose_backend("json", json.dumps(DEPENDABOT), mode="xgrammar")
    assert "allOf at #" in str(e.value) and '"json_schema_strict": false' in str(e.value)
    with pytest.raises(GrammarError, match="no grammar backend enforces") as e:
        choose_backend("json", json.dumps(UNIQUE))
    assert "xgrammar does not enforce uniqueItems at #" in str(e.value)
    assert "llguidance does not enforce uniqueItems at #" in str(e.value)
    best = choose_backend("json", json.dumps(UNIQUE), strict=False)
    assert (best.backend, best.exact, best.not_enforced) == ("xgrammar", False, ("uniqueItems at #",))
    # a schema xgrammar cannot parse (draft-07 tuple items) goes to llguidance
    assert choose_backend("json", json.dumps({"type": "array", "items": [{"type": "integer"}]})).backend == "llguidance"
    with pytest.raises(GrammarError, match="json_schema is not valid JSON"):
        choose_backend("json", "{bad")


def test_structural_tag_reports_the_gaps_of_its_schemas():
    tag = {"structures": [{"begin": "<f>", "schema": UNIQUE, "end": "</f>"}], "triggers": ["<f>"]}
    choice = choose_backend("structural_tag", json.dumps(tag))
    assert (choice.backend, choice.exact) == ("xgrammar", False)
    assert choice.not_enforced == ("structures[0]: uniqueItems at #",)


@pytest.mark.parametrize(("kind", "spec", "text"), [
    ("regex", r"(yes|no)[.!]", "no!"),
    ("choices", json.dumps(["red", "green"]), "green"),
    ("ebnf", 'root ::= "a" [0-9]+', "a12"),
    ("structural_tag", json.dumps({"structures": [{"begin": "<f>", "schema": {"type": "integer"}, "end": "</f>"}],
                                   "triggers": ["<f>"]}), "hi <f>12</f>"),
])
def test_llguidance_matcher_contract(backends, tok_path, kind, spec, text):
    """Masks, accept, jump-forward, rollback and termination behave as for xgrammar."""
    backend = backends["llguidance"]
    m = backend.create_matcher(backend.get_compiled(backend.compile_async(kind, spec)))
    ids = Tokenizer.from_file(tok_path).encode(text, add_special_tokens=False).ids
    mask = backend.allocate_bitmask(2)
    for t in ids:
        m.fill_bitmask(mask, 1)
        assert (mask[1, t // 32] >> (t % 32)) & 1, f"token {t} masked out"
        assert m.accept_token(t)
    if kind != "structural_tag":  # complete: no more text (token 1 is a special token, never allowed)
        assert not m.accept_token(ids[0]) and not m.accept_token(1)
    m.rollback(len(ids))
    assert m.accept_string(text) and m.accept_token(EOS) and m.is_terminated()
    m.reset()
    assert not m.is_terminated() and m.find_jump_forward_string() == ("a" if kind == "ebnf" else "")


def test_mixed_backend_mask_batch_matches_each_backend(backends):
    """One bitmask filled by both backends' batch fill equals each matcher's own row."""
    xgr, llg = backends["xgrammar"], backends["llguidance"]
    spec = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    mx = xgr.create_matcher(xgr.get_compiled(xgr.compile_async("json", spec)))
    ml = [llg.create_matcher(llg.get_compiled(llg.compile_async("json", spec))) for _ in range(2)]
    ml[1].accept_string('{"n": ')
    batch = xgr.allocate_bitmask(3)
    used_x, _ = xgr.fill_bitmasks([(mx, 0)], batch)
    used_l, failed = llg.fill_bitmasks([(ml[0], 1), (ml[1], 2)], batch)
    assert used_x == [0] and used_l == [1, 2] and not failed
    for row, m in [(1, ml[0]), (2, ml[1])]:
        own = llg.allocate_bitmask(1)
        m.fill_bitmask(own, 0)
        assert torch.equal(own[0], batch[row])


def test_llguidance_mask_fill_matches_its_own_torch_helper(backends, tok_path):
    """The pointer fill (one row, one row of a batch, a batch through the executor) writes the
    same mask as llguidance's checked torch helper, at every step of a JSON text."""
    import llguidance.torch as llg_torch

    llg = backends["llguidance"]
    compiled = llg.get_compiled(llg.compile_async("json", json.dumps(DEPENDABOT)))
    m, twin = llg.create_matcher(compiled), llg.create_matcher(compiled)
    text = '{"version": 2, "updates": [{"package-ecosystem": "pip", "directory": "/"}]}'
    ref, got = llg.allocate_bitmask(1), llg.allocate_bitmask(3)
    for t in Tokenizer.from_file(tok_path).encode(text, add_special_tokens=False).ids + [EOS]:
        llg_torch.fill_next_token_bitmask(m._m, ref, 0)
        got.fill_(0)
        assert m.fill_bitmask(got, 2) is True and torch.equal(got[2], ref[0])
        assert llg.fill_bitmasks([(m, 1)], got) == ([1], {}) and torch.equal(got[1], ref[0])
        assert llg.fill_bitmasks([(twin, 2), (m, 0)], got) == ([2, 0], {})
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[0])
        assert m.accept_token(t) and twin.accept_token(t)
    assert m.is_terminated()
    with pytest.raises(ValueError, match="out of range"):
        llg.fill_bitmasks([(twin, 3)], got)
    with pytest.raises(ValueError, match="contiguous 2-D int32 CPU"):
        twin.fill_bitmask(got.t(), 0)


def _manager(tok_dir: str, vocab: int):
    from radixflow.runtime.config import EngineConfig
    from radixflow.runtime.scheduler.grammar_manager import GrammarManager

    return GrammarManager(EngineConfig(tokenizer=tok_dir), tok_dir, vocab, [EOS], tokenizer=None)


def _req(i: int, manager, backend: str | None, kind: str = "", spec: str = "", prefix: str = ""):
    from radixflow.runtime.req import Req
    from radixflow.runtime.sampling_params import SamplingParams

    req = Req(f"r{i}", [1, 2], SamplingParams(temperature=1.0, max_new_tokens=4), seed=i)
    if backend is not None:
        b = manager.backend(backend)
        req.grammar = b.create_matcher(b.get_compiled(b.compile_async(kind, spec)))
        req.grammar_info = {"backend": backend}
        assert not prefix or req.grammar.accept_string(prefix)
    return req


def test_mask_hook_masks_rows_in_place_like_each_matcher(tok_path):
    """The scheduler's hook on a batch mixing both backends and free rows, twice (its bitmask is
    reused, so the second batch meets stale rows): constrained rows are masked exactly as each
    matcher's own mask says, free rows are untouched."""
    manager = _manager(os.path.dirname(tok_path), VOCAB)
    spec = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    batches = [[_req(0, manager, None), _req(1, manager, "xgrammar", "json", spec),
                _req(2, manager, "llguidance", "json", spec, '{"n": '), _req(3, manager, None)],
               [_req(4, manager, "llguidance", "json", spec), _req(5, manager, None)]]
    for reqs in batches:
        logits = torch.randn(len(reqs), VOCAB)
        want = logits.clone()
        for i, r in enumerate(reqs):
            if r.grammar is not None:
                own = manager.backends[r.grammar_info["backend"]].allocate_bitmask(1)
                r.grammar.fill_bitmask(own, 0)
                apply_bitmask_torch(want[i:i + 1], own)
        assert manager.mask_fn(reqs)(logits) == {}
        assert torch.equal(logits, want)
    assert manager.mask_fn([_req(6, manager, None)]) is None


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> tuple[str, int]:
    """(folder, vocab size) of a byte-level BPE tokenizer without the letter c: a grammar that
    needs a c reaches a dead end (no token can continue it)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["ab ba aab {} 12"] * 10, trainer=trainers.BpeTrainer(
        vocab_size=40, special_tokens=["<s>", "<pad>", "</s>"], initial_alphabet=[]))
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    assert tok.token_to_id("</s>") == EOS and tok.token_to_id("c") is None
    return str(folder), tok.get_vocab_size()


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance"])
def test_dead_end_grammar_fails_the_request_not_sampled_freely(tiny_tokenizer, backend):
    """A grammar that no token can continue is caught on either backend (llguidance: its own
    error state; xgrammar: an all-zero row that is still applied), and the sampler fails that
    row alone; the live constrained row samples the one token its grammar allows."""
    from radixflow.runtime.model.sampler import Sampler

    folder, vocab = tiny_tokenizer
    manager = _manager(folder, vocab)
    b_id = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).token_to_id("b")
    reqs = [_req(0, manager, None), _req(1, manager, backend, "regex", "ac", "a"),
            _req(2, manager, backend, "regex", "ab", "a")]
    out = Sampler().sample(torch.randn(3, vocab), reqs, manager.mask_fn(reqs))
    assert out.next_ids[0] is not None and out.next_ids[2] == b_id and list(out.faults) == [1]
    stage, err = out.faults[1]
    if backend == "llguidance":
        assert stage == "grammar mask" and "dead end" in str(err)
    else:
        assert stage == "sampling" and "no finite logit" in str(err)


def test_output_report_length_cut_and_invalid():
    info = choose_backend("json", json.dumps(UNIQUE), strict=False).info("json", json.dumps(UNIQUE))
    cut = grammar_report(info, "[1, 2", {"type": "length", "length": 4})
    assert cut["output_valid"] is False and "finish_reason length" in cut["validation_error"]
    dup = grammar_report(info, "[1, 1, 2]", {"type": "stop", "matched": EOS})
    assert dup["output_valid"] is False and "non-unique" in dup["validation_error"]
    assert dup["not_enforced"] == ["uniqueItems at #"] and "spec" not in dup
    assert grammar_report(info, "[1, 2, 3]", None)["output_valid"] is True


# ---- end to end on the default model -------------------------------------------------------


def test_engine_dependabot_case_runs_exactly_on_llguidance(engine):
    prompt = "Write a dependabot configuration as JSON:"
    params = [{"json_schema": DEPENDABOT, "temperature": 0.8, "seed": s, "max_new_tokens": 80} for s in range(3)]
    for res in engine.generate([prompt] * 3, params):
        report = res["meta_info"]["grammar"]
        assert report["backend"] == "llguidance" and report["exact"] and report["not_enforced"] == []
        if res["meta_info"]["finish_reason"]["type"] == "stop":
            jsonschema.validate(json.loads(res["text"]), DEPENDABOT)
            assert report["output_valid"] is True and report["validation_error"] is None


def test_engine_strict_refusal_and_best_effort_report(engine):
    prompt = "List a few digits as a JSON array:"
    with pytest.raises(GenerationError, match="no grammar backend enforces .*uniqueItems at #"):
        engine.generate(prompt, {"json_schema": UNIQUE, "max_new_tokens": 24})
    res = engine.generate(prompt, {"json_schema": UNIQUE, "json_schema_strict": False, "max_new_tokens": 24,
                                   "temperature": 1.0, "seed": 5})
    report = res["meta_info"]["grammar"]
    assert report["exact"] is False and report["not_enforced"] == ["uniqueItems at #"]
    truth = jsonschema.Draft202012Validator(UNIQUE).is_valid(json.loads(res["text"]))
    assert report["output_valid"] is truth  # reported as it is, whichever way the sample went


def test_server_refusal_is_a_400_and_openai_choice_reports():
    from server_utils import assert_error, shared_server

    with shared_server().client() as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        r = client.post("/generate", json={"text": "Digits:", "sampling_params": {"json_schema": UNIQUE,
                                                                                   "max_new_tokens": 16}})
        err = assert_error(r, 400)
        assert "uniqueItems at #" in err["message"] and "json_schema_strict" in err["message"]
        body = {"model": model, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "Give three digits."}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "digits", "schema": UNIQUE, "strict": False}}}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["grammar"]["not_enforced"] == ["uniqueItems at #"]
        assert isinstance(choice["grammar"]["output_valid"], bool)
        r = client.post("/v1/chat/completions", json={**body, "response_format": {
            "type": "json_schema", "json_schema": {"name": "digits", "schema": UNIQUE}}})
        assert_error(r, 400)
