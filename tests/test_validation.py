"""Request validation: every hostile value found from outside is refused with a message that
names its field, in the in-process Engine and on the server (400), and nothing else is harmed.

Each server case below once crashed the scheduler (NaN / overflowing logit_bias, NaN
temperature), was silently accepted (infinite temperature, an unresolvable $ref) or was a 500
(a 10**30 seed, a lone surrogate, a body nested 10,000 levels deep)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from server_utils import assert_error, shared_server, wait_pool_whole

from radixflow.grammars import GrammarError
from radixflow.grammars.xgrammar_backend import validate_grammar
from radixflow.runtime.sampling_params import SamplingParams, SamplingParamsError, copy_seed
from radixflow.runtime.validation import (
    MAX_JSON_DEPTH,
    check_json_nesting,
    check_logprob_args,
    check_strings,
    check_text,
    check_token_ids,
    json_depth,
)

# ---- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 1e9), ("top_p", float("nan")),
    ("min_p", float("nan")), ("frequency_penalty", float("inf")), ("presence_penalty", float("nan")),
    ("repetition_penalty", float("nan")), ("max_new_tokens", 10**30), ("top_k", 10**30), ("n", 10**30),
    ("seed", 10**30), ("seed", -(2**63) - 1), ("seed", 1.5),
])
def test_sampling_params_refuse_non_finite_and_out_of_type_values(field, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams.from_dict({field: value})


@pytest.mark.parametrize("bias", [{"42": "nan"}, {"42": float("nan")}, {"42": 1e39}, {"42": -101},
                                  {"x": 1.0}, {"42": True}, [1, 2]])
def test_logit_bias_values_must_be_finite_numbers_within_the_openai_range(bias):
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams.from_dict({"logit_bias": bias})


def test_valid_edge_values_pass():
    p = SamplingParams.from_dict({"logit_bias": {"42": 100, 7: -100.0}, "seed": 2**63 - 1, "temperature": 100})
    assert p.logit_bias == {42: 100.0, 7: -100.0}
    assert copy_seed(2**63 - 1, 1) == -(2**63)  # n > 1 copies wrap within 64 bits, never overflow
    assert copy_seed(5, 2) == 7 and copy_seed(None, 3) is None


def test_text_must_be_valid_unicode():
    check_text("héllo ✓", "prompt")
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        check_text("a\ud800b", "prompt")


def test_json_depth_is_measured_without_parsing_and_ignores_brackets_in_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    check_json_nesting(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    with pytest.raises(ValueError, match="10000 levels deep"):
        check_json_nesting(b"[" * 10000 + b"]" * 10000)
    t = time.perf_counter()
    json_depth(json.dumps({"text": "x" * 4_000_000, "ids": list(range(300_000))}).encode())
    assert time.perf_counter() - t < 5  # linear, not a Python loop per byte (a generous bound)


@pytest.mark.parametrize("schema,needle", [
    ({"$ref": "#/definitions/nope"}, "definitions"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "$defs": {}}, "missing"),
    ({"$ref": "https://example.com/schema.json"}, "remote references are not fetched"),
    ({"$ref": "other.json#/x"}, "not supported"),
])
def test_unresolvable_refs_are_refused(schema, needle):
    with pytest.raises(GrammarError, match=needle):
        validate_grammar("json", json.dumps(schema))


def test_resolvable_refs_pass():
    validate_grammar("json", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/a~1b"},
                                                                          "enum": {"type": "string"}},
                                         "$defs": {"a/b": {"type": "integer"}}}))


def test_refs_are_percent_decoded_as_xgrammar_resolves_them():
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/a%20b"}}, "$defs": {"a b": {"type": "integer"}}}
    validate_grammar("json", json.dumps(schema))
    schema["$defs"] = {"a%20b": {"type": "integer"}}
    with pytest.raises(GrammarError, match="does not resolve"):
        validate_grammar("json", json.dumps(schema))


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                                   "repetition_penalty"])
def test_float_fields_refuse_integers_too_large_for_a_float(field):
    """math.isfinite(10**400) raises OverflowError (not a ValueError, so a 500 on the server)."""
    with pytest.raises(SamplingParamsError, match=f"{field} must be a finite number, got an integer of 1329 bits"):
        SamplingParams.from_dict({field: 10**400})


@pytest.mark.parametrize("key", ["4_2", " 42", "42 ", "1.5", "+42", "\u0664\u0662", "1" * 20, 1.5, True, None])
def test_logit_bias_keys_must_be_decimal_token_ids(key):
    """int() alone would take "4_2", " 42" and Arabic-Indic digits, and truncate 1.5 to 1."""
    with pytest.raises(SamplingParamsError, match="logit_bias keys must be token ids"):
        SamplingParams.from_dict({"logit_bias": {key: 1}})
    assert SamplingParams.from_dict({"logit_bias": {"-0": 1, "7": 2}}).logit_bias == {0: 1.0, 7: 2.0}


def test_messages_stay_short_for_huge_values():
    """str() of an int past 4300 digits raises; an 8 MB key must not come back in the message."""
    for sp, field in [({"max_new_tokens": 10**5000}, "max_new_tokens"), ({"seed": -(10**5000)}, "seed"),
                      ({"logit_bias": {"9" * 100_000: 1}}, "logit_bias"), ({"stop_token_ids": [10**5000]}, None)]:
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams.from_dict(sp).validate(vocab_size=100)
        assert len(str(e.value)) < 160 and (field or "stop_token_ids") in str(e.value)


@pytest.mark.parametrize("sp,needle", [
    ({"json_schema": 5}, "json_schema must be a string"), ({"regex": ["a"]}, "regex must be a string"),
    ({"ebnf": b"root ::= x"}, "ebnf must be a string"), ({"json_schema": {"a": float("nan")}}, "json_schema is not"),
    ({"json_schema": {"a": {1, 2}}}, "json_schema is not"), ("temperature=0", "sampling_params must be an object"),
    ({"json_schema": '{"a": ' + "[" * 10_000 + "]" * 10_000 + "}"}, "json_schema nests 10001 levels deep"),
])
def test_constraint_specs_are_strings_of_bounded_depth(sp, needle):
    with pytest.raises(SamplingParamsError, match=needle):
        SamplingParams.from_dict(sp)


def test_a_deep_json_schema_is_a_grammar_error_not_a_recursion_error():
    """The scheduler treats only GrammarError as a refused request; validate_grammar is public."""
    with pytest.raises(GrammarError, match="nests too deeply"):
        validate_grammar("json", '{"type": "object", "properties": {"a": ' + "[" * 10_000 + "]" * 10_000 + "}}")


def test_check_strings_reaches_any_depth_without_recursion():
    deep: list = ["\ud800"]
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="messages is not valid Unicode"):
        check_strings({"k": deep}, "messages")
    with pytest.raises(ValueError, match="sp is not valid Unicode"):
        check_strings({"\udc00": 1}, "sp")  # keys too
    check_strings({"a": ["b", 1, None, {"c": 2.5}]}, "sp")


def test_token_ids_and_logprob_args():
    check_token_ids([0, 5], "input_ids")
    check_logprob_args(-1, 0, 5)
    for ids in ([1, 2.5], [True], ["1"], 5):
        with pytest.raises(ValueError, match="input_ids must be a list of token ids"):
            check_token_ids(ids, "input_ids")
    for start, top, field in [(-2, 0, "logprob_start_len"), (1.0, 0, "logprob_start_len"),
                              (0, 6, "top_logprobs_num"), (0, -1, "top_logprobs_num"), (0, 10**30, "top_logprobs_num")]:
        with pytest.raises(ValueError, match=field):
            check_logprob_args(start, top, 5)


# ---- the in-process Engine ------------------------------------------------------------------


@pytest.mark.parametrize("sp,field", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"logit_bias": {"42": "nan"}}, "logit_bias"), ({"logit_bias": {"42": 1e39}}, "logit_bias"),
    ({"seed": 10**30}, "seed"), ({"stop": ["\ud800"]}, "sampling_params"),
])
def test_engine_refuses_bad_values_and_serves_on(engine, sp, field):
    with pytest.raises(ValueError, match=field):
        engine.generate("Hi", {"max_new_tokens": 2, **sp})
    assert engine.generate("Hi", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] == 2


def test_engine_refuses_a_lone_surrogate_prompt(engine):
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        engine.generate("Hi \ud800", {"max_new_tokens": 2})


@pytest.mark.parametrize("kwargs,field", [
    ({"input_ids": [1, 2.5]}, "input_ids"), ({"input_ids": [[1, 2], [3, "x"]]}, "input_ids"),
    ({"input_ids": [1, True]}, "input_ids"), ({"input_ids": 5}, "input_ids"),
    ({"prompt": "Hi", "return_logprob": True, "top_logprobs_num": 10**30}, "top_logprobs_num"),
    ({"prompt": "Hi", "return_logprob": True, "top_logprobs_num": -5}, "top_logprobs_num"),
    ({"prompt": "Hi", "return_logprob": True, "logprob_start_len": -7}, "logprob_start_len"),
    ({"prompt": "Hi", "sampling_params": "max_new_tokens=2"}, "sampling_params"),
    ({"prompt": "Hi", "sampling_params": {"top_p": 10**400}}, "top_p"),
])
def test_engine_refuses_bad_ids_and_arguments(engine, kwargs, field):
    """10**30 top logprobs once reached torch.topk ("Overflow when unpacking long long")."""
    with pytest.raises(ValueError, match=field):
        engine.generate(**{"sampling_params": {"max_new_tokens": 2}, **kwargs})


def test_engine_survives_a_json_schema_string_nested_10000_deep(engine):
    """This once killed the in-process Engine's scheduler (RecursionError in the grammar compile):
    every later call failed with "the engine's scheduler failed"."""
    deep = '{"type": "object", "properties": {"a": ' + "[" * 10_000 + "]" * 10_000 + "}}"
    with pytest.raises(ValueError, match="json_schema nests"):
        engine.generate("Hi", {"max_new_tokens": 2, "json_schema": deep})
    assert engine.generate("Hi", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] == 2


# ---- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


CHAT = b'"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
CASES = {
    "logit_bias_nan_string": ("/generate", b'{"text": "Hi", "sampling_params": {"logit_bias": {"42": "nan"}}}',
                              "logit_bias"),
    "logit_bias_nan": ("/generate", b'{"text": "Hi", "sampling_params": {"logit_bias": {"42": NaN}}}', "logit_bias"),
    "logit_bias_overflows_float32": ("/generate", b'{"text": "Hi", "sampling_params": {"logit_bias": {"42": 1e39}}}',
                                     "logit_bias"),
    "chat_logit_bias_nan_string": ("/v1/chat/completions", b'{' + CHAT + b', "logit_bias": {"42": "nan"}}',
                                   "logit_bias"),
    "chat_logit_bias_overflows_float32": ("/v1/chat/completions", b'{' + CHAT + b', "logit_bias": {"42": 1e39}}',
                                          "logit_bias"),
    "temperature_nan": ("/generate", b'{"text": "Hi", "sampling_params": {"temperature": NaN}}', "temperature"),
    "chat_temperature_nan": ("/v1/chat/completions", b'{' + CHAT + b', "temperature": NaN}', "temperature"),
    "temperature_infinite": ("/generate", b'{"text": "Hi", "sampling_params": {"temperature": 1e999}}',
                             "temperature"),
    "seed_overflows_int64": ("/generate", b'{"text": "Hi", "sampling_params": {"seed": 1' + b"0" * 30 + b"}}",
                             "seed"),
    "chat_seed_overflows_int64": ("/v1/chat/completions", b'{' + CHAT + b', "seed": 1' + b"0" * 30 + b"}", "seed"),
    "lone_surrogate_in_prompt": ("/generate", b'{"text": "Hi \\ud800", "sampling_params": {"max_new_tokens": 2}}',
                                 "text"),
    "lone_surrogate_in_chat_message": ("/v1/chat/completions",
                                       b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
                                       "messages"),
    "body_nested_10000_deep": ("/generate", b'{"text": ' + b"[" * 10000 + b"]" * 10000 + b"}", "levels deep"),
    "unresolvable_ref": ("/generate", json.dumps({"text": "Hi", "sampling_params": {
        "max_new_tokens": 4, "json_schema": {"$ref": "#/definitions/nope"}}}).encode(), "$ref"),
    "json_schema_string_nested_10000_deep": ("/generate", json.dumps({"text": "Hi", "sampling_params": {
        "max_new_tokens": 4, "json_schema": "[" * 10_000 + "]" * 10_000}}).encode(), "json_schema"),
    "top_p_integer_too_large_for_a_float": ("/generate", b'{"text": "Hi", "sampling_params": {"top_p": 1'
                                            + b"0" * 400 + b"}}", "top_p"),
    "chat_temperature_integer_too_large_for_a_float": ("/v1/chat/completions",
                                                       b'{' + CHAT + b', "temperature": 1' + b"0" * 400 + b"}",
                                                       "temperature"),
    "logit_bias_key_not_a_decimal_token_id": ("/generate",
                                              b'{"text": "Hi", "sampling_params": {"logit_bias": {"4_2": 1}}}',
                                              "logit_bias"),
    "chat_stop_lone_surrogate": ("/v1/chat/completions", b'{' + CHAT + b', "stop": ["\\ud800"]}', "stop"),
    "remote_ref": ("/generate", json.dumps({"text": "Hi", "sampling_params": {
        "max_new_tokens": 4, "json_schema": {"$ref": "https://example.com/s.json"}}}).encode(), "$ref"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_a_400_naming_the_field(server, client, case):
    path, raw, field = CASES[case]
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    err = assert_error(r, 400)
    assert field in err["message"] or field == err["param"], err
    # The same connection and the server go on.
    ok = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert ok.status_code == 200, ok.text
    assert server.alive()


def test_after_the_hostile_inputs_the_pool_is_whole(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    wait_pool_whole(client)


def test_completions_with_an_out_of_range_token_id_prompt_is_a_400(client):
    """Found by the fuzzer: the echo text was decoded before the ids were checked (a 500)."""
    r = client.post("/v1/completions", json={"prompt": [-1], "max_tokens": 2})
    assert_error(r, 400)
    assert "input token id -1" in r.json()["error"]["message"]


def test_chat_message_with_a_non_string_role_is_a_400(client):
    """Found by the fuzzer: an unhashable role ([]) was a 500."""
    r = client.post("/v1/chat/completions", json={"messages": [{"role": [], "content": "Hi"}], "max_tokens": 2})
    assert assert_error(r, 400)["param"] == "messages"
