"""OpenAI tool calling on /v1/chat/completions: the request's `tools`, `tool_choice` and
`parallel_tool_calls` checked (each refusal a 400 naming the field), the conversation rendered
through the model's chat template, the calls forced by a structural tag (`required`, a named
function) or parsed from free text (`auto`), and the response's `tool_calls`, whole or streamed.

`tool_choice="none"` (or no tools) leaves the request an ordinary chat completion.
"""

from __future__ import annotations

import json
import re
from typing import Any

from radixflow.runtime.server.request_state import bad_request
from radixflow.runtime.text.tool_calls import (
    ToolCallStream,
    dialect_for,
    forced_calls_tag,
    parse_tool_calls,
    render_messages,
    template_knows_tools,
)

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONSTRAINTS = ("json_schema", "regex", "ebnf", "choices", "structural_tag")


def _functions(tools: Any) -> list[dict[str, Any]]:
    """The `function` objects of `tools`, checked."""
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list of function tools", param="tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise bad_request(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -", param="tools")
        if name in seen:
            raise bad_request(f"tools: the function name {name!r} appears twice", param="tools")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad_request(f"tools[{i}].function.description must be a string", param="tools")
        out.append({**fn, "parameters": params})
    return out


def _choice(choice: Any, names: set[str]) -> str | dict[str, Any]:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", '
                          '"function": {"name": ...}}', param="tool_choice")
    if fn["name"] not in names:
        raise bad_request(f"tool_choice names the function {fn['name']!r}, which is not in tools",
                          param="tool_choice")
    return fn["name"]


def _check_history(messages: list[dict[str, Any]]) -> None:
    """Assistant `tool_calls` and `tool` messages of the conversation, as OpenAI shapes them."""
    for m in messages:
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments", ""), str) for c in calls)):
            raise bad_request("tool_calls belong to assistant messages, each with function.name and "
                              "function.arguments (a JSON string)", param="messages")
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise bad_request("a tool message needs the tool_call_id of the call it answers", param="messages")


class ToolSession:
    """The tool-calling side of one chat request: built from its body (None when the request
    uses no tools), it renders the conversation, constrains sampling and shapes the answer."""

    def __init__(self, functions: list[dict[str, Any]], choice: str, parallel: bool, template: str) -> None:
        self.functions = functions if choice in ("auto", "required", "none") else [
            f for f in functions if f["name"] == choice]
        self.names = {f["name"] for f in functions}
        self.choice, self.parallel = choice, parallel
        self.knows_tools = template_knows_tools(template)
        self.dialect = dialect_for(template)
        self.streams: dict[int, ToolCallStream] = {}
        self.made_calls: set[int] = set()

    @classmethod
    def from_body(cls, body: dict[str, Any], messages: list[dict[str, Any]], template_for: Any) -> ToolSession | None:
        """`template_for(tools)` gives the chat template source the tokenizer would use."""
        _check_history(messages)
        tools = body.get("tools")
        if tools is None:
            if body.get("tool_choice") not in (None, "none"):
                raise bad_request("tool_choice needs tools", param="tool_choice")
            if body.get("parallel_tool_calls") is not None:
                raise bad_request("parallel_tool_calls needs tools", param="parallel_tool_calls")
            return None
        functions = _functions(tools)
        choice = _choice(body.get("tool_choice"), {f["name"] for f in functions})
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise bad_request("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
        if choice == "none":
            return None
        return cls(functions, choice, parallel, template_for(tools))

    @property
    def tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": f} for f in self.functions]

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return render_messages(messages, self.tools, self.knows_tools)

    def constrain(self, sp: dict[str, Any]) -> None:
        """With `required` or a named function, the output is calls and nothing else: their
        arguments follow the functions' schemas (a structural tag for the grammar backend)."""
        if self.choice == "auto":
            return
        given = [k for k in _CONSTRAINTS if sp.get(k) is not None]
        if given:
            raise bad_request(f"tool_choice={self.choice!r} constrains the output; it cannot be combined with "
                              f"{given[0]} (or response_format)", param="tool_choice")
        tag = forced_calls_tag(self.dialect, self.functions, self.parallel and self.choice == "required")
        sp["structural_tag"] = json.dumps(tag, ensure_ascii=False)

    def message(self, i: int, text: str) -> dict[str, Any]:
        """The assistant message of choice `i` for its finished text."""
        content, calls = parse_tool_calls(text, self.dialect, self.names)
        if not self.parallel:
            calls = calls[:1]
        if self.choice != "auto":  # the grammar allowed calls only: what is left is a call cut by length
            content = None
        if calls:
            self.made_calls.add(i)
        return {"role": "assistant", "content": content, **({"tool_calls": [c.to_openai() for c in calls]}
                                                             if calls else {})}

    def stream_deltas(self, i: int, text: str, final: bool) -> list[dict[str, Any]]:
        """The chunk deltas of choice `i` for its cumulative `text`."""
        st = self.streams.setdefault(i, ToolCallStream(self.dialect, self.names))
        deltas = st.finish(text) if final else st.feed(text)
        if st.calls:
            self.made_calls.add(i)
        return [{"delta": d} for d in deltas]

    def finish_reason(self, i: int, reason: str | None) -> str | None:
        """OpenAI's finish_reason: "tool_calls" when choice `i` called tools (a named function
        ends with "stop", as OpenAI's does)."""
        if reason == "stop" and i in self.made_calls and self.choice in ("auto", "required"):
            return "tool_calls"
        return reason
