"""End-to-end tests of the OpenAI-compatible API, driven by the real `openai` client."""

from __future__ import annotations

import importlib.util
import json

import openai
import pytest
from server_utils import API_KEY, ServerProcess, assert_error, shared_server, wait_pool_whole

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HAS_GRAMMARS = importlib.util.find_spec("radixflow.runtime.scheduler.grammar_manager") is not None


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(oai) -> str:
    return oai.models.list().data[0].id


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def test_models(oai, model, server):
    models = oai.models.list().data
    assert [m.id for m in models] == [model]
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_chat_stream_matches_non_stream(oai, model):
    full = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) >= 3, "streamed token by token"
    assert "".join(deltas) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens
    # The same prompt again: served from the radix cache.
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1


def test_chat_stops_at_end_of_turn(oai, model):
    question = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]
    r = oai.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 16
    assert "4" in r.choices[0].message.content and "<|im_end|>" not in r.choices[0].message.content


def test_chat_logprobs(oai, model):
    r = oai.chat.completions.create(model=model, messages=QUESTION, max_completion_tokens=4, temperature=0,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens <= 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token


def test_completions_n_seed_and_batch(oai, model):
    kw = dict(model=model, prompt="Once upon a time", max_tokens=5, temperature=1.0, n=2, seed=123)
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices], "same seed, same samples"
    assert a.usage.prompt_tokens == 4, "the prompt is counted once, not once per choice"
    batch = oai.completions.create(model=model, prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0)
    singles = [oai.completions.create(model=model, prompt=p, max_tokens=3, temperature=0).choices[0].text
               for p in ("One, two,", "A, B,")]
    assert [c.text for c in batch.choices] == singles


def test_completions_stop_echo_logprobs(oai, model):
    r = oai.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and " 7" not in r.choices[0].text
    r = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0,
                               echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The capital of France is")
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[1] == len(lp.tokens[0])
    streamed = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text[len("The capital of France is"):]


def test_extra_sampling_fields(oai, model):
    r = oai.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0.7,
                               extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


@pytest.mark.skipif(not HAS_GRAMMARS, reason="grammar backend (runtime/grammar_manager.py) not available")
def test_response_format_json_schema(oai, model):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    r = oai.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["city"], str)
    r = oai.completions.create(model=model, prompt="The answer is ", max_tokens=4, temperature=0,
                               extra_body={"regex": "(yes|no)"})
    assert r.choices[0].text in ("yes", "no")


def test_stream_disconnect_frees_slots(oai, model, client):
    stream = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=200, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_pool_whole(client, timeout=30)


BAD = [
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 0}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": -1}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 10**9}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 100}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "frobnicate": True}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "stream_options": {"include_usage": True}}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "xml"}}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "json_schema"}}, 400),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-17"}, 404),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [1.5]}, 400),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400),
    ("/v1/completions", {"prompt": [1] * 5000}, 400),
    ("/v1/completions", {"prompt": "hi", "model": 5}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}-{p.split('/')[-1]}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_request(client, model, path, body, status):
    assert_error(client.post(path, json={"model": model, **body}), status)


def test_bad_requests_through_client_then_ok(oai, model):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=QUESTION, n=0)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt=[1] * 5000, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    r = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


@pytest.mark.skipif(not HAS_GRAMMARS, reason="grammar backend (runtime/grammar_manager.py) not available")
@pytest.mark.parametrize("stream", [False, True])
def test_scheduler_refusal_is_a_400(client, model, stream):
    """A constraint the grammar backend rejects comes back as 400 (streamed or not)."""
    body = {"model": model, "messages": QUESTION, "max_tokens": 4, "regex": "(unclosed", "stream": stream}
    err = assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert "regex" in err["message"]
    native = {"text": "hi", "stream": stream, "sampling_params": {"max_new_tokens": 2, "regex": "(unclosed"}}
    assert_error(client.post("/generate", json=native), 400)
