"""OpenAI tool calling: parsing and streaming of calls (unit), and /v1/chat/completions with
tools through the real `openai` client against a real server."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from server_utils import API_KEY, AUTH, ServerProcess, shared_server, wait_pool_whole

from radixflow.runtime.text.tool_calls import (
    HERMES,
    LLAMA3_JSON,
    ToolCallStream,
    dialect_for,
    parse_tool_calls,
    render_messages,
    template_knows_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMES = set(SCHEMAS)
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


# ---- parsing (no server) -------------------------------------------------------------------------

def _replay(stream: ToolCallStream, text: str, step: int = 3) -> tuple[str, dict[int, dict[str, str]]]:
    deltas = [d for i in range(1, len(text) + 1, step) for d in stream.feed(text[:i])] + stream.finish(text)
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for c in d.get("tool_calls", []):
            entry = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            entry["name"] += c["function"].get("name", "")
            entry["arguments"] += c["function"].get("arguments", "")
    return content, calls


HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {x}", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
               '</tool_call>')


def test_hermes_calls_parse_whole_and_streamed() -> None:
    content, calls = parse_tool_calls(HERMES_TEXT, HERMES, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris {x}", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    s_content, s_calls = _replay(ToolCallStream(HERMES, NAMES), HERMES_TEXT)
    assert s_content.strip() == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in s_calls.values()] == [
        (c.name, json.loads(c.arguments)) for c in calls]


def test_llama3_json_calls_parse_whole_and_streamed() -> None:
    text = '{"name": "add", "parameters": {"a": 1, "b": "}"}}; {"name": "get_weather", "parameters": {}}'
    content, calls = parse_tool_calls(text, LLAMA3_JSON, NAMES)
    assert content is None and [c.name for c in calls] == ["add", "get_weather"]
    _, s_calls = _replay(ToolCallStream(LLAMA3_JSON, NAMES), text, step=1)
    assert [json.loads(c["arguments"]) for c in s_calls.values()] == [{"a": 1, "b": "}"}, {}]


@pytest.mark.parametrize("text", ["Just an answer, no calls.", "<tool_call>\n{not json}\n</tool_call>",
                                  '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'])
def test_text_that_is_not_a_call_stays_content(text: str) -> None:
    assert parse_tool_calls(text, HERMES, NAMES) == (text, [])
    content, calls = _replay(ToolCallStream(HERMES, NAMES), text)
    assert calls == {} and content == text


def test_templates_that_know_tools_and_those_that_do_not() -> None:
    qwen_like = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}<tool_call>"
    llama_like = "{% if tools %}Environment: ipython{% endif %}<|python_tag|>"
    assert template_knows_tools(qwen_like) and dialect_for(qwen_like) is HERMES
    assert dialect_for(llama_like) is LLAMA3_JSON
    assert not template_knows_tools("{{ messages[0].content }}") and dialect_for("x") is HERMES
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    plain = render_messages(history, TOOLS, knows_tools=False)
    assert plain[0]["role"] == "system" and '"get_weather"' in plain[0]["content"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in plain[2]["content"]
    assert plain[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}
    native = render_messages(history, TOOLS, knows_tools=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}  # templates tojson it


# ---- the server, through the openai client -------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_server()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    yield c
    import httpx
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as h:
        wait_pool_whole(h)


def _check_calls(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls or []:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        assert call.type == "function" and call.id.startswith("call_")
        out.append((call.function.name, args))
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_calls_validate(client: openai.OpenAI, temperature: float) -> None:
    for seed, parallel in ((0, False), (1, True)):
        r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=parallel, max_tokens=48, temperature=temperature,
                                           seed=seed)
        calls = _check_calls(r.choices[0].message)
        assert calls, r.choices[0]
        assert r.choices[0].message.content is None


def test_named_function_is_called(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=64, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    calls = _check_calls(r.choices[0].message)
    assert [name for name, _ in calls] == ["add"] and r.choices[0].finish_reason == "stop"


def test_one_call_without_parallel_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=48, temperature=0)
    assert len(_check_calls(r.choices[0].message)) == 1
    assert r.choices[0].finish_reason == "tool_calls"


def test_streamed_call_deltas_match_the_whole_answer(client: openai.OpenAI) -> None:
    kw = dict(model="default", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=48, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += (tc.function.name or "") if tc.function else ""
                entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected
    assert finish == whole.finish_reason == "tool_calls"


def test_tool_results_feed_back_into_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=48, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    second = client.chat.completions.create(model="default", messages=history, tools=TOOLS, max_tokens=16,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_tool_choice_none_is_an_ordinary_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not in tools"),
    ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "appears twice"),
    ({"tools": [], "tool_choice": "auto"}, "tools", "non-empty"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
])
def test_bad_tool_requests_are_400s(client: openai.OpenAI, extra: dict, param: str, words: str) -> None:
    kw = {"model": "default", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err


def test_tool_choice_without_tools_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=ASK, tool_choice="required", max_tokens=4)
    assert "needs tools" in e.value.body["message"]


def test_structural_tag_response_format(client: openai.OpenAI) -> None:
    tag = {"type": "structural_tag", "structures": [
        {"begin": "<city>", "schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
                                       "required": ["name"]}, "end": "</city>"}], "triggers": ["<city>"]}
    r = client.chat.completions.create(model="default", max_tokens=48, temperature=0, response_format=tag,
                                       messages=[{"role": "user", "content": "Name a city inside <city> tags."}])
    assert r.choices[0].finish_reason in ("stop", "length")


QWEN_STYLE = """{%- if tools %}<|im_start|>system
<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{%- for m in messages %}{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for tc in m.tool_calls %}{%- set tc = tc.function %}
<tool_call>
{"name": "{{ tc.name }}", "arguments": {{ tc.arguments | tojson }}}
</tool_call>{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}<|im_start|>assistant
"""


def test_a_template_that_knows_tools_renders_calls_and_results() -> None:
    from radixflow.runtime.text.chat_template import compile_chat_template

    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    assert template_knows_tools(QWEN_STYLE) and dialect_for(QWEN_STYLE) is HERMES
    text = compile_chat_template(QWEN_STYLE).render(messages=render_messages(history, TOOLS, knows_tools=True),
                                                   tools=TOOLS)
    assert '{"name": "add", "arguments": {"a": 1, "b": 2}}' in text  # an object, not a JSON string in a string
    assert "<tool_response>\n3\n</tool_response>" in text and '"get_weather"' in text
    # What the template wrote is what the parser reads back.
    call_text = text[text.index("<tool_call>"):text.index("</tool_call>") + len("</tool_call>")]
    _, calls = parse_tool_calls(call_text, HERMES, NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
