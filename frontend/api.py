"""The DSL's public constructors: `function`, `gen` and its typed forms, `select`, chat roles."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from radixflow.frontend import ir
from radixflow.frontend.choices import ChoicesMethod, token_length_normalized
from radixflow.frontend.function import Function

_DTYPES = ("int", "float", "bool", "str")


def dtype_regex(name: str) -> str:
    """The regex for a gen dtype, from radixflow.grammars.regex_utils (imported on first use: the
    grammar package pulls in xgrammar and torch)."""
    from radixflow.grammars import regex_utils

    return {"int": regex_utils.INT_REGEX, "float": regex_utils.FLOAT_REGEX, "bool": regex_utils.BOOL_REGEX,
            "str": regex_utils.STRING_REGEX}[name]


def function(func: Callable[..., Any] | None = None) -> Any:
    """Decorator: `@rf.function def prog(s, ...)` -> a Function with run / run_batch / bind."""
    if func is None:
        return function
    return Function(func)


def _schema_text(json_schema: Any) -> str | None:
    if json_schema is None or isinstance(json_schema, str):
        return json_schema
    if isinstance(json_schema, dict):
        return json.dumps(json_schema)
    if hasattr(json_schema, "model_json_schema"):  # a pydantic model class
        return json.dumps(json_schema.model_json_schema())
    raise TypeError(f"json_schema must be a str, a dict or a pydantic model, got {type(json_schema).__name__}")


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = dtype.__name__ if isinstance(dtype, type) else str(dtype)
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of int, float, bool, str; got {dtype!r}")
    return name


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
        stop_regex: str | Sequence[str] | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None, repetition_penalty: float | None = None,
        ignore_eos: bool | None = None, seed: int | None = None, return_logprob: bool | None = None,
        logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None, dtype: Any = None, choices: Sequence[str] | None = None,
        choices_method: ChoicesMethod | None = None, regex: str | None = None,
        json_schema: Any = None) -> ir.Expr:
    """Generate text after the current text; store it in `s[name]`. Unset settings come from run().

    `stop_regex` ends the text at the first match of a pattern (trimmed there, as at a stop string).
    `regex` / `json_schema` (str, dict or pydantic model) constrain the output; `dtype` (int, float,
    bool, str) is a shorthand for a regex (the variable stays a string); `choices` makes it a select."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or token_length_normalized)
    dname = _dtype_name(dtype)
    schema = _schema_text(json_schema)
    if sum(x is not None for x in (dname, regex, schema)) > 1:
        raise ValueError("give at most one of dtype, regex and json_schema")
    if dname is not None:
        regex = dtype_regex(dname)
    args = ir.SamplingArgs(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, stop=stop, stop_token_ids=stop_token_ids,
        stop_regex=stop_regex, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
        seed=seed, regex=regex, json_schema=schema, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs)
    return ir.Gen(name, args, dname)


def gen_int(name: str | None = None, **kwargs: Any) -> ir.Expr:
    """`gen` constrained to an integer (INT_REGEX)."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> ir.Expr:
    """`gen` constrained to a double-quoted string (STRING_REGEX); the quotes are part of the text."""
    return gen(name, dtype=str, **kwargs)


def select(name: str | None = None, choices: Sequence[str] | None = None, temperature: float = 0.0,
           choices_method: ChoicesMethod = token_length_normalized) -> ir.Expr:
    """Append the best of `choices` (non-empty strings) as scored by `choices_method` from the
    model's logprobs; `s[name]` is the chosen string, `s.get_meta_info(name)` the scores.
    Scoring is deterministic: `temperature` is accepted for SGLang compatibility and not used."""
    if not choices or isinstance(choices, str):
        raise ValueError("select needs a non-empty list of choices")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select choices must be non-empty strings")
    if not isinstance(choices_method, ChoicesMethod):
        raise TypeError("choices_method must be a ChoicesMethod such as rf.token_length_normalized")
    return ir.Select(name, tuple(choices), choices_method, temperature)


def _role(role: str, expr: Any) -> ir.ExprList:
    body = [] if expr is None else [ir.to_expr(expr)]
    return ir.ExprList([ir.RoleBegin(role), *body, ir.RoleEnd(role)])


def system(expr: Any = None) -> ir.ExprList:
    """A system message holding `expr` (text and/or expressions), in the model's chat template."""
    return _role("system", expr)


def user(expr: Any = None) -> ir.ExprList:
    """A user message holding `expr`."""
    return _role("user", expr)


def assistant(expr: Any = None) -> ir.ExprList:
    """An assistant message holding `expr`; gens inside stop at the template's end-of-turn string."""
    return _role("assistant", expr)


def system_begin() -> ir.RoleBegin:
    return ir.RoleBegin("system")


def system_end() -> ir.RoleEnd:
    return ir.RoleEnd("system")


def user_begin() -> ir.RoleBegin:
    return ir.RoleBegin("user")


def user_end() -> ir.RoleEnd:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.RoleBegin:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.RoleEnd:
    return ir.RoleEnd("assistant")
