"""Tool calls as text: how a model writes a call (its dialect), the prompt for templates that do
not know tools, the grammar that forces calls, and parsing calls back out of the output, whole or
as it streams.

Two dialects cover the common templates:
- `hermes` (Qwen2.5, Hermes, and the default for templates without tools):
  `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call;
- `llama3_json` (Llama 3.1 / 3.2): `{"name": "f", "parameters": {...}}`, calls separated by `; `.

A template "knows tools" when its source reads the `tools` variable; otherwise the tools are
described in a system message (hermes format), earlier calls are written into the assistant's
content, and `tool` results become user turns in `<tool_response>` blocks.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Dialect", "ToolCall", "ToolCallStream", "dialect_for", "forced_calls_tag", "parse_tool_calls",
           "render_messages", "template_knows_tools"]


@dataclass(frozen=True)
class Dialect:
    """How one call is written: `begin` + `{"name": NAME, "<args_key>": ARGS}` + `end`, calls joined by `separator`."""

    name: str
    begin: str
    end: str
    args_key: str
    separator: str


HERMES = Dialect("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "\n")
LLAMA3_JSON = Dialect("llama3_json", "", "", "parameters", "; ")


def template_knows_tools(template: str) -> bool:
    """True when the chat template renders the `tools` it is given."""
    return re.search(r"\btools\b", template) is not None


def dialect_for(template: str) -> Dialect:
    """The dialect a model with this chat template writes calls in."""
    if template_knows_tools(template) and ("<|python_tag|>" in template or "Environment: ipython" in template):
        return LLAMA3_JSON
    return HERMES


@dataclass
class ToolCall:
    """One parsed call; `arguments` is the JSON text of the arguments object."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_text(d: Dialect, name: str, args: Any) -> str:
    args_json = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'{d.begin}{{"name": {json.dumps(name, ensure_ascii=False)}, "{d.args_key}": {args_json}}}{d.end}'


def _system_prompt(tools: list[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. The functions are listed "
            f"in <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\nFor each function call, return "
            "a JSON object with the function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    knows_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for the chat template. Assistant `tool_calls` carry their arguments as
    objects (templates write them with `tojson`). For a template that does not know tools, the
    tools go into the system message and calls and results become plain text."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if knows_tools:
            if calls:
                m = {**m, "tool_calls": [_with_object_arguments(c) for c in calls]}
            out.append(m)
            continue
        if m["role"] == "assistant" and calls:
            text = "\n".join(_call_text(HERMES, c["function"]["name"], c["function"].get("arguments") or "{}")
                             for c in calls)
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if tools and not knows_tools:
        prompt = _system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # the template writes it as the string it is
    return {**call, "function": fn}


def forced_calls_tag(d: Dialect, functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """An xgrammar structural tag whose every output is one call (several if `parallel`) of
    `functions` ({"name", "parameters"} each) and nothing else, in dialect `d`."""
    tags = [{"type": "tag", "begin": f'{d.begin}{{"name": {json.dumps(f["name"], ensure_ascii=False)}, '
                                     f'"{d.args_key}": ',
             # At most one blank between JSON tokens: a small model otherwise loops on indentation.
             "content": {"type": "json_schema", "json_schema": f.get("parameters") or {"type": "object"},
                         "max_whitespace_cnt": 1},
             "end": f"}}{d.end}"} for f in functions]
    return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags,
                                                 "separator": d.separator, "at_least_one": True,
                                                 "stop_after_first": not parallel}}


def _json_end(text: str, start: int) -> int | None:
    """The index after the JSON object or array starting at text[start], or None if it is not closed yet."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _parse_call(body: str, names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, d: Dialect, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output. Calls that do not parse, or name no given
    function, stay in the content; content is None when only calls were written."""
    if d.begin:
        calls, kept, pos = [], [], 0
        pattern = re.compile(re.escape(d.begin.strip()) + r"\s*(.*?)\s*" + re.escape(d.end.strip()), re.DOTALL)
        for m in pattern.finditer(text):
            call = _parse_call(m.group(1), names)
            if call is not None:
                kept.append(text[pos:m.start()])
                pos = m.end()
                calls.append(call)
        kept.append(text[pos:])
        content = "".join(kept).strip()
        return (content or None) if calls else text, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    calls, pos = [], 0
    while pos < len(body) and body[pos] == "{":
        end = _json_end(body, pos)
        call = _parse_call(body[pos:end], names) if end is not None else None
        if call is None:
            return text, []
        calls.append(call)
        pos = end + len(body[end:]) - len(body[end:].lstrip(" \n;"))
    return (None, calls) if calls and pos >= len(body) else (text, [])


class ToolCallStream:
    """Splits a streamed output into content deltas and OpenAI tool-call deltas as it grows.

    `feed(text)` takes the cumulative text and returns the new deltas: `{"content": str}` or
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` (the first delta
    of a call names it with empty arguments; the next ones carry argument text). `finish(text)`
    flushes the rest. Text that might still become a call marker is held back until it is known.
    """

    _HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')

    def __init__(self, d: Dialect, names: set[str]) -> None:
        self.d, self.names = d, names
        self.pos = 0  # text before pos was turned into deltas
        self.calls: list[ToolCall] = []
        self.in_call = False
        self.args_start: int | None = None  # where the current call's arguments begin
        self.args_sent = 0
        self.plain = False  # bare dialects: the output turned out to be text, not calls
        self.call_start = 0  # where the current call's text begins

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            step = self._step_call(text, out) if self.in_call else self._step_content(text, out)
            if not step:
                return out

    def finish(self, text: str) -> list[dict[str, Any]]:
        out = self.feed(text)
        if self.in_call and self.args_start is None:  # a call whose header we could not follow
            content, calls = parse_tool_calls(text[self.call_start:], self.d, self.names)
            for call in calls:
                self.calls.append(call)
                out.append(self._delta(id=call.id, type="function", name=call.name, arguments=call.arguments))
            if content:
                out.append({"content": content})
        elif self.pos < len(text) and not self.in_call and text[self.pos:].strip():
            out.append({"content": text[self.pos:]})
        self.pos = len(text)
        return out

    def _step_content(self, text: str, out: list[dict[str, Any]]) -> bool:
        if not self.d.begin:
            return self._step_bare(text, out)
        marker = self.d.begin.strip()
        at = text.find(marker, self.pos)
        if at < 0:  # hold back a possible start of the marker
            keep = next((k for k in range(min(len(marker), len(text) - self.pos), 0, -1)
                         if text.endswith(marker[:k])), 0)
            return self._emit_content(text, len(text) - keep, out)
        self._emit_content(text, at, out)
        self.in_call, self.pos, self.args_start, self.args_sent = True, at + len(marker), None, 0
        self.call_start = at
        return True

    def _step_bare(self, text: str, out: list[dict[str, Any]]) -> bool:
        """Dialects without a marker: calls are JSON objects at the start of the output, or after
        a separator that follows a call; anything else makes the rest plain content."""
        if self.plain:
            return self._emit_content(text, len(text), out)
        rest = text[self.pos:]
        skip = len(rest) - len(rest.lstrip(" \n;" if self.calls else " \n"))
        if not self.calls and rest[skip:].startswith("<|python_tag|>"):
            skip += len("<|python_tag|>")
            skip += len(rest[skip:]) - len(rest[skip:].lstrip())
        if skip == len(rest):
            return False  # only whitespace so far
        if rest[skip] != "{":
            self.plain = True
            return self._emit_content(text, len(text), out)
        self.in_call, self.pos, self.args_start, self.args_sent = True, self.pos + skip, None, 0
        self.call_start = self.pos
        return True

    def _emit_content(self, text: str, upto: int, out: list[dict[str, Any]]) -> bool:
        piece = text[self.pos:upto]
        if piece and (piece.strip() or not self.calls):
            out.append({"content": piece})
        self.pos = max(self.pos, upto)
        return False

    def _step_call(self, text: str, out: list[dict[str, Any]]) -> bool:
        if self.args_start is None:
            m = self._HEADER.match(text, self.pos)
            if m is None or m.end() == len(text):
                return False  # the header is not complete yet
            if json.loads(f'"{m.group(1)}"') not in self.names:
                return False  # not a call of ours: it stays text and comes out at finish
            self.calls.append(ToolCall(json.loads(f'"{m.group(1)}"'), ""))
            out.append(self._delta(id=self.calls[-1].id, type="function", name=self.calls[-1].name, arguments=""))
            self.args_start = m.end()
        end = _json_end(text, self.args_start)
        upto = len(text) if end is None else end
        if upto > self.args_start + self.args_sent:
            piece = text[self.args_start + self.args_sent:upto]
            self.args_sent += len(piece)
            self.calls[-1].arguments += piece
            out.append(self._delta(arguments=piece))
        if end is None:
            return False
        close = text.find("}", end)
        tail = self.d.end.strip()
        stop = (text.find(tail, close) + len(tail)) if tail and close >= 0 and tail in text[close:] else (
            close + 1 if close >= 0 and not tail else -1)
        if stop < 0:
            return False
        self.in_call, self.pos = False, stop
        return True

    def _delta(self, **fn: Any) -> dict[str, Any]:
        item: dict[str, Any] = {"index": len(self.calls) - 1}
        if "id" in fn:
            item.update(id=fn.pop("id"), type=fn.pop("type"))
        item["function"] = fn
        return {"tool_calls": [item]}
