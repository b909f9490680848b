"""The routing text of a request: what the router matches against its per-worker trees.

/generate: `text` (the first prompt of a batch) or `input_ids` (each id as one character);
/v1/completions: `prompt` likewise; /v1/chat/completions: each message's role and content,
concatenated. A body the router cannot read gives "" (routed by load; the worker answers its
error)."""

from __future__ import annotations

import json
from typing import Any

_IDS_MARK = "\x00ids:"  # token-id keys never share a prefix with text keys


def routing_text(path: str, raw: bytes) -> str:
    """The routing text of a request to `path` with JSON body `raw` ("" when there is none)."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return ""
    if not isinstance(body, dict):
        return ""
    if path == "/generate":
        return _prompt_text(body.get("text") if body.get("text") is not None else body.get("input_ids"))
    if path == "/v1/completions":
        return _prompt_text(body.get("prompt"))
    if path == "/v1/chat/completions":
        return _chat_text(body.get("messages"))
    return ""


def _prompt_text(prompt: Any) -> str:
    """A string; a list of strings (the first); token ids; a list of token-id lists (the first)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return _IDS_MARK + "".join(chr(t % 0x110000) for t in prompt)
    return ""


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            return ""
        parts.append(f"<{m.get('role')}>{_content_text(m.get('content'))}\n")
    return "".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
