"""Checking a finished constrained output against the spec the client sent.

:func:`grammar_report` turns the scheduler's grammar info (backend, exactness, the spec) and
the final text into the ``meta_info["grammar"]`` report:
``{"backend", "exact", "not_enforced", "approximated", "output_valid", "validation_error"}``.

- JSON schemas: the text must parse as JSON and validate against the whole schema (jsonschema,
  the draft its ``$schema`` names, else 2020-12, else draft 7 for schemas only valid there;
  formats checked where jsonschema's format checker can). ``choices``: the text is one of them.
  ``regex``: Python's ``re.fullmatch`` where Python compiles the pattern. EBNF and structural
  tags are not checked (``output_valid`` None).
- An aborted request is not checked. An output cut by the length limit is checked like any
  other; when invalid its error says that it was cut.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

_MAX_ERROR = 300


@functools.lru_cache(maxsize=64)
def _validator(spec: str) -> Any:
    import jsonschema

    schema = json.loads(spec)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        if cls is not jsonschema.Draft202012Validator:
            raise
        cls = jsonschema.Draft7Validator  # e.g. "items": [...] tuples, valid only in older drafts
        cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_json(spec: str, text: str) -> str | None:
    """None if ``text`` is JSON valid against the schema ``spec``, else the first error."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not valid JSON: {e}"
    try:
        validator = _validator(spec)
    except jsonschema.SchemaError as e:
        return f"the schema itself is invalid: {_short(e.message)}"
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" for p in error.absolute_path) or "the top level"
    return f"{_short(error.message)} (at {where})"


def check_output(kind: str, spec: str, text: str) -> tuple[bool | None, str | None]:
    """(valid, error) of a finished output; valid is None when ``kind`` is not checked."""
    if kind == "json":
        err = check_json(spec, text)
        return err is None, err
    if kind == "choices":
        ok = text in json.loads(spec)
        return ok, None if ok else f"{_short(repr(text))} is not one of the choices"
    if kind == "regex":
        try:
            pattern = re.compile(spec)
        except re.error:
            return None, None  # a dialect Python does not read: not checked
        ok = pattern.fullmatch(text) is not None
        return ok, None if ok else "the output does not match the regex"
    return None, None


def grammar_report(info: dict[str, Any], text: str, finish_reason: dict[str, Any] | None) -> dict[str, Any]:
    """``meta_info["grammar"]`` for a finished request; ``info`` is the scheduler's grammar info."""
    report = {k: info[k] for k in ("backend", "exact", "not_enforced", "approximated") if k in info}
    kind = (finish_reason or {}).get("type")
    if kind == "abort":
        return {**report, "output_valid": None, "validation_error": "the request was aborted"}
    try:
        valid, error = check_output(info["kind"], info["spec"], text)
    except RecursionError:
        valid, error = False, "the output nests too deeply to check"
    if valid is False and kind == "length":
        error = f"cut by the length limit (finish_reason length) before the output was complete: {error}"
    return {**report, "output_valid": valid, "validation_error": error}


def _short(s: str) -> str:
    return s if len(s) <= _MAX_ERROR else s[:_MAX_ERROR - 3] + "..."
