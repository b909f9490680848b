"""The program IR: what `s += ...` appends. Expressions are inert values; the interpreter runs them.

`Constant` text, `Gen` (a generation into a variable), `Select` (a choice scored by logprobs),
`RoleBegin` / `RoleEnd` (chat roles, rendered by the backend's chat template), and `ExprList`
(a sequence; `a + b` of any two expressions or of an expression and a string builds one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")

# Wire names of the sampling fields a program may set (DESIGN §6, native /generate API).
_SAMPLING_FIELDS = (
    "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "ignore_eos", "seed", "regex",
    "json_schema",
)
_LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


@dataclass(frozen=True)
class SamplingArgs:
    """Sampling settings of one `gen` or of a whole run; None means "inherit from the level above"
    (gen -> run(...) defaults -> the backend's own defaults)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop_regex: tuple[str, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids", "stop_regex"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, (v,))
            elif v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        if self.regex is not None and self.json_schema is not None:
            raise ValueError("give at most one of regex and json_schema")

    def over(self, base: SamplingArgs) -> SamplingArgs:
        """These settings, with unset (None) fields taken from `base`."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **changes)

    def wire(self, extra_stop: tuple[str, ...] = ()) -> dict[str, Any]:
        """The `sampling_params` dict of a /generate request (set fields only), plus `extra_stop`."""
        out: dict[str, Any] = {}
        for name in _SAMPLING_FIELDS:
            v = getattr(self, name)
            if v is not None:
                out[name] = list(v) if isinstance(v, tuple) else v
        if extra_stop:
            out["stop"] = list(dict.fromkeys([*out.get("stop", []), *extra_stop]))
        return out

    def logprob_options(self) -> dict[str, Any]:
        """The request-level logprob options (return_logprob, logprob_start_len, ...) that are set."""
        return {n: getattr(self, n) for n in _LOGPROB_FIELDS if getattr(self, n) is not None}


class Expr:
    """Base of all program expressions; `+` concatenates into an ExprList."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList([self, to_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([to_expr(other), self])


@dataclass(eq=False)
class Constant(Expr):
    text: str


@dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable `name` (None: text only)."""

    name: str | None
    args: SamplingArgs
    dtype: str | None = None


@dataclass(eq=False)
class Select(Expr):
    """Append whichever of `choices` scores best after the current text; store it in `name`."""

    name: str | None
    choices: tuple[str, ...]
    method: Any  # a ChoicesMethod (frontend.choices)
    temperature: float = 0.0


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


class ExprList(Expr):
    """A flat sequence of expressions (nested lists are flattened on construction)."""

    def __init__(self, exprs: list[Expr]) -> None:
        self.exprs: list[Expr] = []
        for e in exprs:
            self.exprs.extend(e.exprs if isinstance(e, ExprList) else [e])

    def __repr__(self) -> str:
        return f"ExprList({self.exprs!r})"


def to_expr(x: Any) -> Expr:
    """A string becomes a Constant; an expression stays itself; anything else is a TypeError."""
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Constant(x)
    raise TypeError(f"cannot add {type(x).__name__} to a program; use a string or an rf expression")


def flatten(expr: Any) -> list[Expr]:
    """The leaf expressions of `expr` in order."""
    e = to_expr(expr)
    return list(e.exprs) if isinstance(e, ExprList) else [e]


def var_names(expr: Any) -> list[str]:
    """Names of the variables `expr` will set."""
    return [e.name for e in flatten(expr) if isinstance(e, (Gen, Select)) and e.name is not None]
