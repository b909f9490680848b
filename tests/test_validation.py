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
from radixflow.runtime.validation import MAX_JSON_DEPTH, check_json_nesting, check_text, json_depth

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
