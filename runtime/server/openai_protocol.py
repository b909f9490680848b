"""The OpenAI request shapes: which fields each endpoint accepts, how they map to native sampling
params, and the parsing of prompts, chat messages and typed fields (each refusal a 400 naming
the field)."""

from __future__ import annotations

import json
from typing import Any

from radixflow.runtime.server.tokenizer_manager import bad_request

# OpenAI name -> SamplingParams name, for fields passed through as they are.
PASS_THROUGH = {"temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop", "seed": "seed",
                "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                "logit_bias": "logit_bias", "top_k": "top_k", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos", "regex": "regex",
                "ebnf": "ebnf", "json_schema": "json_schema", "min_tokens": "min_new_tokens",
                "stop_token_ids": "stop_token_ids", "skip_special_tokens": "skip_special_tokens",
                "no_stop_trim": "no_stop_trim", "spaces_between_special_tokens": "spaces_between_special_tokens",
                "structural_tag": "structural_tag", "stop_regex": "stop_regex"}
COMMON_KEYS = set(PASS_THROUGH) | {"model", "max_tokens", "stream", "stream_options", "user", "logprobs",
                                    "response_format"}
COMPLETION_KEYS = COMMON_KEYS | {"prompt", "echo", "best_of", "suffix"}
CHAT_KEYS = COMMON_KEYS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                            "parallel_tool_calls", "store", "metadata", "service_tier", "chat_template_kwargs"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_object(body: Any, keys: set[str]) -> dict[str, Any]:
    """`body` if it is a JSON object whose fields are all in `keys`."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - keys)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    return body


def int_field(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    """`body[key]` (`default` when absent or null), an integer in [lo, hi]."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(f"{key} must be an integer {bounds}, got {v!r}", param=key)
    return v


def bool_field(body: dict[str, Any], key: str, default: bool) -> bool:
    """`body[key]` (`default` when absent or null), a boolean."""
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{key} must be a boolean", param=key)
    return v


def finish_reason(fr: dict[str, Any] | None) -> str | None:
    """OpenAI's finish_reason for a native one: stop, length, or abort (anything else)."""
    return None if fr is None else {"stop": "stop", "length": "length"}.get(fr.get("type"), "abort")


def sampling_fields(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The native sampling params of an OpenAI body: pass-through fields, max_tokens and
    response_format (as json_schema or structural_tag)."""
    sp = {dst: body[src] for src, dst in PASS_THROUGH.items() if body.get(src) is not None}
    if max_tokens is not None:
        sp["max_new_tokens"] = max_tokens
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema", "structural_tag"):
            raise bad_request("response_format.type must be text, json_object, json_schema or structural_tag",
                              param="response_format")
        if rf["type"] == "structural_tag":  # SGLang's: {"type", "structures", "triggers"} or {"type", "format"}
            if "structural_tag" in sp:
                raise bad_request("give structural_tag or response_format, not both", param="response_format")
            sp["structural_tag"] = json.dumps(rf)
        elif rf["type"] == "json_object":
            sp["json_schema"] = json.dumps({"type": "object"})
        elif rf["type"] == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                                  param="response_format")
            if "json_schema" in sp:
                raise bad_request("give json_schema or response_format, not both", param="response_format")
            sp["json_schema"] = json.dumps(schema)
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise bad_request("response_format.json_schema.strict must be true or false", param="response_format")
            if strict is False:  # absent or true: refuse a schema the backends cannot enforce exactly
                sp["json_schema_strict"] = False
    return sp


def with_grammar(choice: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """The choice with a `grammar` field (meta_info["grammar"]: the backend, what it did not
    enforce, whether the output validates against the schema) when the request was constrained."""
    report = res.get("meta_info", {}).get("grammar")
    return choice if report is None else {**choice, "grammar": report}


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A /v1/completions `prompt` as a list of prompts (strings or token-id lists)."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise bad_request("prompt must be a non-empty string, a list of strings, a list of token ids or a list of such "
                      "lists", param="prompt")


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Validated chat messages, multi-part text content joined, `developer` read as `system`."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise bad_request(f"each message needs a role in {sorted(_ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise bad_request("only text content parts are supported", param="messages")
                parts.append(p["text"])
            content = "\n".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request("message content must be a string or a list of text parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({**{k: v for k, v in m.items() if k not in ("role", "content")}, "role": role, "content": content})
    return out
