"""Property-based fuzzing of a real `radixflow serve`: generated requests, valid and hostile,
across the native and OpenAI APIs. Whatever is sent, the answer is never a 5xx, the server stays
up, and once everything has finished the KV pool is whole.

Values are drawn from a mix of plausible settings and junk (NaN, infinities, huge integers,
wrong types, lone surrogates, nested garbage): JSON bodies are written with Python's json, which
emits NaN and Infinity literals as the server's parser reads them.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import ServerProcess, shared_server, wait_pool_whole

pytestmark = pytest.mark.slow

# Requests per endpoint: three endpoints, at least 2,000 requests in all.
EXAMPLES = {"generate": 800, "completions": 650, "chat": 650}
_sent = {"requests": 0, "200": 0, "4xx": 0}

_SETTINGS = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))

# ---- values ----------------------------------------------------------------------------------

_junk_scalar = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -1e39, 1e308, 5e-324, float("nan"), float("inf"), -float("inf"), 2**63, -(2**63) - 1]),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=6),
    st.sampled_from(["nan", "inf", "-1", "1e999", "", "\ud800", "0x10"]),
)
_junk = st.recursive(_junk_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.text(max_size=4), kids, max_size=3), max_leaves=6)


def _mix(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Plausible values (some out of range), one in eight junk: most requests reach the engine."""
    return st.one_of(*[plausible] * 7, _junk)


_small_float = st.floats(min_value=-3, max_value=3, allow_nan=False)
_token_ids = st.integers(min_value=-5, max_value=50000)
_SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
    {"type": "string", "maxLength": 3},
    {"$ref": "#/definitions/missing"},
    {"type": "array", "items": {"$ref": "#/$defs/x"}, "$defs": {"x": {"type": "boolean"}}, "maxItems": 2},
    {"type": "frobnicate"},
    {"enum": ["yes", "no"]},
]
_REGEXES = ["[0-9]{1,3}", "(yes|no)", "(", "a{5,2}", ".*", "[a-z]+@[a-z]+\\.com", "\\d{2}-\\d{2}"]
_text = st.text(st.characters(codec=None, exclude_categories=()), min_size=0, max_size=24)
_prompt = st.one_of(st.sampled_from(["Hi", "The capital of France is", "1, 2, 3,", "Q: why?\nA:"]), _text)

# Keys common to the native sampling_params and the OpenAI bodies (OpenAI names where they differ).
_SAMPLING = {
    "temperature": _mix(st.one_of(st.just(0.0), st.floats(min_value=0, max_value=2))),
    "top_p": _mix(st.floats(min_value=0, max_value=1.2)),
    "top_k": _mix(st.integers(min_value=-2, max_value=60)),
    "min_p": _mix(st.floats(min_value=-0.1, max_value=1.1)),
    "frequency_penalty": _mix(_small_float),
    "presence_penalty": _mix(_small_float),
    "repetition_penalty": _mix(st.floats(min_value=0, max_value=2.5)),
    "logit_bias": _mix(st.dictionaries(st.one_of(_token_ids.map(str), st.text(max_size=3)),
                                       st.one_of(st.floats(min_value=-150, max_value=150), _junk_scalar),
                                       max_size=3)),
    "seed": _mix(st.integers(min_value=-(2**64), max_value=2**64)),
    "stop": _mix(st.one_of(_text, st.lists(_text, max_size=3))),
    "stop_token_ids": _mix(st.lists(_token_ids, max_size=3)),
    "n": _mix(st.integers(min_value=0, max_value=3)),
    "ignore_eos": _mix(st.booleans()),
    "regex": st.sampled_from(_REGEXES),
    "json_schema": st.one_of(st.sampled_from(_SCHEMAS), st.sampled_from(_SCHEMAS).map(json.dumps), _junk),
}
_max_tokens = _mix(st.one_of(st.integers(min_value=0, max_value=3), st.integers(min_value=10**6, max_value=10**30),
                             st.integers(min_value=-(10**30), max_value=-1)))


def _optional(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional=fields)


def _native_sampling() -> st.SearchStrategy:
    fields = dict(_SAMPLING, min_new_tokens=_mix(st.integers(min_value=0, max_value=2)),
                  no_stop_trim=_mix(st.booleans()), skip_special_tokens=_mix(st.booleans()))
    return st.builds(lambda d, m: {**d, "max_new_tokens": m}, _optional(fields), _max_tokens)


_generate_body = st.builds(
    lambda prompt, extra, sp: {**extra, **prompt, "sampling_params": sp},
    st.one_of(st.builds(lambda t: {"text": t}, _mix(st.one_of(_prompt, st.lists(_prompt, min_size=1, max_size=2)))),
              st.builds(lambda ids: {"input_ids": ids}, _mix(st.lists(_token_ids, max_size=8)))),
    _optional({"return_logprob": _mix(st.booleans()), "top_logprobs_num": _mix(st.integers(-1, 3)),
               "logprob_start_len": _mix(st.integers(-2, 4)), "stream": _mix(st.booleans()),
               "rid": _mix(st.uuids().map(str)), "bogus_field": _junk}),
    _mix(_native_sampling()),
)

_openai_common = dict(_SAMPLING, max_tokens=_max_tokens, stream=_mix(st.booleans()), model=_mix(st.just("default")),
                      min_tokens=_mix(st.integers(0, 2)),
                      response_format=_mix(st.sampled_from([
                          {"type": "json_object"}, {"type": "text"},
                          {"type": "json_schema", "json_schema": {"name": "x", "schema": _SCHEMAS[0]}},
                          {"type": "json_schema", "json_schema": {"name": "x", "schema": _SCHEMAS[2]}},
                          {"type": "yaml"}])))
_completions_body = st.builds(lambda p, d: {**d, "prompt": p, "max_tokens": d.get("max_tokens", 2)},
                              _mix(st.one_of(_prompt, st.lists(_prompt, max_size=2))),
                              _optional(dict(_openai_common, logprobs=_mix(st.integers(0, 3)),
                                             echo=_mix(st.booleans()))))
_message = st.fixed_dictionaries({"role": _mix(st.sampled_from(["user", "system", "assistant"])),
                                  "content": _mix(_prompt)})
_chat_body = st.builds(lambda m, d: {**d, "messages": m, "max_tokens": d.get("max_tokens", 2)},
                       _mix(st.lists(_message, min_size=1, max_size=3)),
                       _optional(dict(_openai_common, logprobs=_mix(st.booleans()),
                                      top_logprobs=_mix(st.integers(-1, 3)))))


# ---- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    with server.client(timeout=60.0) as c:
        yield c


def _send(client: httpx.Client, path: str, body: dict) -> None:
    raw = json.dumps(body)  # NaN / Infinity literals included, as a hostile client may send them
    _sent["requests"] += 1
    with client.stream("POST", path, content=raw, headers={"Content-Type": "application/json"}) as r:
        payload = r.read()  # a stream is read to its end
    assert r.status_code < 500, (path, raw[:2000], r.status_code, payload[:2000])
    _sent["200" if r.status_code == 200 else "4xx"] += 1
    if r.status_code >= 400:
        err = json.loads(payload)["error"]
        assert err["message"], payload


@settings(_SETTINGS, max_examples=EXAMPLES["generate"])
@given(body=_generate_body)
def test_fuzz_native_generate(client, body):
    _send(client, "/generate", body)


@settings(_SETTINGS, max_examples=EXAMPLES["completions"])
@given(body=_completions_body)
def test_fuzz_openai_completions(client, body):
    _send(client, "/v1/completions", body)


@settings(_SETTINGS, max_examples=EXAMPLES["chat"])
@given(body=_chat_body)
def test_fuzz_openai_chat(client, body):
    _send(client, "/v1/chat/completions", body)


def test_after_fuzzing_the_server_is_alive_and_the_pool_whole(server, client):
    assert _sent["requests"] >= 2000 or _sent["requests"] == 0, _sent  # 0: run alone (-k)
    print(f"fuzzing: {_sent}")
    assert server.alive()
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert r.status_code == 200, r.text
    wait_pool_whole(client)
