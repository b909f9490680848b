"""Sampling parameters of one request, validated once at the door."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-6
_MAX_TEMPERATURE = 100.0  # beyond this every distribution is uniform to float precision
_MAX_INT = 2**31 - 1  # token counts, n and top_k: anything larger is a mistake or an attack


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclass
class SamplingParams:
    """What to sample and when to stop. Field names follow SGLang's native API.

    `temperature < 1e-6` means greedy. `top_k = -1` means off. At most one of
    `json_schema`, `regex`, `ebnf`, `choices` may be set.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    choices: list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a JSON-style dict; unknown keys are an error (typos must not pass silently)."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if d.get("stop") is None:
            d.pop("stop", None)
        if d.get("stop_token_ids") is None:
            d.pop("stop_token_ids", None)
        if isinstance(d.get("json_schema"), dict):
            import json

            d["json_schema"] = json.dumps(d["json_schema"])
        if d.get("logit_bias"):
            d["logit_bias"] = _parse_logit_bias(d["logit_bias"])
        elif d.get("logit_bias") is None:
            d.pop("logit_bias", None)
        p = cls(**d)
        p.validate()
        return p

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def grammar_spec(self) -> tuple[str, str] | None:
        """(kind, spec) of the constraint, or None when unconstrained."""
        if self.json_schema is not None:
            return ("json", self.json_schema)
        if self.regex is not None:
            return ("regex", self.regex)
        if self.ebnf is not None:
            return ("ebnf", self.ebnf)
        if self.choices is not None:
            import json

            return ("choices", json.dumps(self.choices))
        return None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError with a precise message on the first bad field."""

        def check_type(name: str, types: tuple[type, ...]) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) and bool not in types:
                raise SamplingParamsError(f"{name} must be {types[0].__name__}, got bool")
            if not isinstance(v, types):
                raise SamplingParamsError(f"{name} must be {types[0].__name__}, got {type(v).__name__}")

        for name in ("max_new_tokens", "min_new_tokens", "n", "top_k"):
            check_type(name, (int,))
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty"):
            check_type(name, (float, int))
            if not math.isfinite(getattr(self, name)):
                raise SamplingParamsError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("max_new_tokens", "min_new_tokens", "n", "top_k"):
            if abs(getattr(self, name)) > _MAX_INT:
                raise SamplingParamsError(f"{name} is out of range: {getattr(self, name)}")
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"):
            check_type(name, (bool,))
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise SamplingParamsError("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids must be a list of integers")
        if self.max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise SamplingParamsError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        if self.n < 1:
            raise SamplingParamsError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.temperature <= _MAX_TEMPERATURE:
            raise SamplingParamsError(f"temperature must be in [0, {_MAX_TEMPERATURE}], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not -2 <= v <= 2:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {v}")
        if not 0 < self.repetition_penalty <= 2:
            raise SamplingParamsError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        constraints = [k for k in ("json_schema", "regex", "ebnf", "choices") if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise SamplingParamsError(f"at most one of json_schema, regex, ebnf, choices; got {constraints}")
        if self.choices is not None and (
            not isinstance(self.choices, list) or not self.choices
            or not all(isinstance(c, str) for c in self.choices)
        ):
            raise SamplingParamsError("choices must be a non-empty list of strings")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise SamplingParamsError(f"seed must be an integer, got {type(self.seed).__name__}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise SamplingParamsError(f"seed must be a 64-bit integer in [-2**63, 2**63), got {self.seed}")
        if not isinstance(self.logit_bias, dict):
            raise SamplingParamsError("logit_bias must map token ids to numbers")
        for t, v in self.logit_bias.items():
            if not isinstance(t, int) or isinstance(t, bool):
                raise SamplingParamsError(f"logit_bias keys must be token ids, got {t!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise SamplingParamsError(f"logit_bias[{t}] must be a number in [-100, 100], got {v!r}")
        if vocab_size is not None:
            for t in list(self.stop_token_ids) + list(self.logit_bias):
                if not 0 <= t < vocab_size:
                    raise SamplingParamsError(f"token id {t} is out of range [0, {vocab_size})")

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def copy_seed(seed: int | None, i: int) -> int | None:
    """The seed of copy i of an n > 1 request: seed + i, wrapped into the 64-bit range."""
    return None if seed is None else (seed + i + 2**63) % 2**64 - 2**63


def _parse_logit_bias(bias: Any) -> dict[int, float]:
    """{token id: bias} from JSON (keys may be strings, as in the OpenAI API). Values must be
    finite numbers in [-100, 100], as the OpenAI API documents; strings such as "nan" are refused."""
    if not isinstance(bias, dict):
        raise SamplingParamsError("logit_bias must map token ids to numbers")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            raise SamplingParamsError(f"logit_bias keys must be token ids, got {k!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise SamplingParamsError(f"logit_bias[{k}] must be a number in [-100, 100], got {v!r}")
        out[t] = float(v)
    return out
