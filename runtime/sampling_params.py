"""Sampling parameters of one request, validated once at the door."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from radixflow.runtime.validation import MAX_JSON_DEPTH, json_depth

_GREEDY_EPS = 1e-6
_MAX_TEMPERATURE = 100.0  # beyond this every distribution is uniform to float precision
_MAX_INT = 2**31 - 1  # token counts, n and top_k: anything larger is a mistake or an attack
# name: (lo, hi, whether lo itself is excluded); every value must also be finite
_FLOAT_RANGES = {"temperature": (0, _MAX_TEMPERATURE, False), "top_p": (0, 1, True), "min_p": (0, 1, False),
                 "frequency_penalty": (-2, 2, False), "presence_penalty": (-2, 2, False),
                 "repetition_penalty": (0, 2, True)}
_TOKEN_ID = re.compile(r"-?[0-9]{1,19}")  # a logit_bias key as JSON spells it: decimal digits only


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclass
class SamplingParams:
    """What to sample and when to stop. Field names follow SGLang's native API.

    `temperature < 1e-6` means greedy. `top_k = -1` means off. At most one of
    `json_schema`, `regex`, `ebnf`, `choices`, `structural_tag` may be set. `stop_regex` ends the
    output at the first match of any of its patterns in the text (trimmed there, as a stop string
    is, unless `no_stop_trim`). `stream_interval` and `custom_params` are accepted as SGLang's
    clients send them; neither changes what is sampled.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
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
    structural_tag: str | None = None
    # False: run a json_schema the grammar backends cannot enforce exactly best-effort (the
    # response reports what was not enforced); True: refuse it (as OpenAI's strict mode)
    json_schema_strict: bool = True
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    stream_interval: int | None = None
    custom_params: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a JSON-style dict; unknown keys are an error (typos must not pass silently)."""
        if d is not None and not isinstance(d, dict):
            raise SamplingParamsError(f"sampling_params must be an object (a dict), got {type(d).__name__}")
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)} | {"sampling_seed"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if "sampling_seed" in d:  # SGLang's name for the seed
            if d.get("seed") is not None and d["sampling_seed"] is not None:
                raise SamplingParamsError("give seed or sampling_seed, not both")
            sampling_seed = d.pop("sampling_seed")
            d["seed"] = d.get("seed", sampling_seed) if sampling_seed is None else sampling_seed
        for name in ("stop", "stop_regex"):
            if isinstance(d.get(name), str):
                d[name] = [d[name]]
            if d.get(name) is None:
                d.pop(name, None)
        if d.get("stop_token_ids") is None:
            d.pop("stop_token_ids", None)
        for name in ("json_schema", "structural_tag"):
            if isinstance(d.get(name), dict):
                try:
                    d[name] = json.dumps(d[name], allow_nan=False)
                except (TypeError, ValueError, RecursionError) as e:
                    raise SamplingParamsError(f"{name} is not a JSON object: {e}") from None
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
            return ("choices", json.dumps(self.choices))
        if self.structural_tag is not None:
            return ("structural_tag", self.structural_tag)
        return None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError, whose message names the field, on the first bad field.

        Every float is finite and within its range (temperature in [0, 100]; logit_bias values
        in [-100, 100], as the OpenAI API documents); every integer is within its type (token
        counts, n and top_k below 2**31; seed in [-2**63, 2**63), refused outside rather than
        reduced, and the copies of an n > 1 request get `copy_seed`, which stays in that range).
        With `vocab_size`, token ids in stop_token_ids and logit_bias are within the vocabulary."""
        self._check_numbers()
        self._check_stops()
        self._check_constraint()
        self._check_seed_and_bias(vocab_size)

    def _check_type(self, name: str, types: tuple[type, ...]) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) and bool not in types:
            raise SamplingParamsError(f"{name} must be {types[0].__name__}, got bool")
        if not isinstance(v, types):
            raise SamplingParamsError(f"{name} must be {types[0].__name__}, got {type(v).__name__}")

    def _check_numbers(self) -> None:
        for name in ("max_new_tokens", "min_new_tokens", "n", "top_k"):
            self._check_type(name, (int,))
            if abs(getattr(self, name)) > _MAX_INT:
                raise SamplingParamsError(f"{name} is out of range: {_show(getattr(self, name))}")
        for name, (lo, hi, open_lo) in _FLOAT_RANGES.items():
            self._check_type(name, (float, int))
            v = getattr(self, name)
            if not _is_finite(v):
                raise SamplingParamsError(f"{name} must be a finite number, got {_show(v)}")
            if not (lo < v <= hi if open_lo else lo <= v <= hi):
                raise SamplingParamsError(f"{name} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}")
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens",
                     "json_schema_strict"):
            self._check_type(name, (bool,))
        for name in ("max_new_tokens", "min_new_tokens"):
            if getattr(self, name) < 0:
                raise SamplingParamsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        if self.n < 1:
            raise SamplingParamsError(f"n must be >= 1, got {self.n}")
        if self.top_k == 0 or self.top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")

    def _check_stops(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise SamplingParamsError("stop strings must not be empty")
        if not isinstance(self.stop_regex, list) or not all(isinstance(s, str) and s for s in self.stop_regex):
            raise SamplingParamsError("stop_regex must be a non-empty string or a list of them")
        for i, pattern in enumerate(self.stop_regex):
            try:
                empty = re.fullmatch(pattern, "") is not None
            except (re.error, RecursionError, OverflowError) as e:
                raise SamplingParamsError(f"stop_regex[{i}] is not a valid regular expression: {e}") from None
            if empty:
                raise SamplingParamsError(f"stop_regex[{i}] matches the empty string, so it would stop at once")
        if self.stream_interval is not None and (
            not isinstance(self.stream_interval, int) or isinstance(self.stream_interval, bool)
            or not 1 <= self.stream_interval <= _MAX_INT
        ):
            raise SamplingParamsError("stream_interval must be a positive integer")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise SamplingParamsError("custom_params must be an object")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids must be a list of integers")

    def _check_constraint(self) -> None:
        for name in ("json_schema", "regex", "ebnf", "structural_tag"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SamplingParamsError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("json_schema", "structural_tag"):
            spec = getattr(self, name)
            depth = 0 if spec is None else json_depth(spec.encode("utf-8", "surrogatepass"))
            if depth > MAX_JSON_DEPTH:  # the grammar compiler recurses once per level
                raise SamplingParamsError(f"{name} nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
        kinds = ("json_schema", "regex", "ebnf", "choices", "structural_tag")
        constraints = [k for k in kinds if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise SamplingParamsError(f"at most one of {', '.join(kinds)}; got {constraints}")
        if self.choices is not None and (
            not isinstance(self.choices, list) or not self.choices
            or not all(isinstance(c, str) for c in self.choices)
        ):
            raise SamplingParamsError("choices must be a non-empty list of strings")

    def _check_seed_and_bias(self, vocab_size: int | None) -> None:
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise SamplingParamsError(f"seed must be an integer, got {type(self.seed).__name__}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise SamplingParamsError(f"seed must be a 64-bit integer in [-2**63, 2**63), got {_show(self.seed)}")
        if not isinstance(self.logit_bias, dict):
            raise SamplingParamsError("logit_bias must map token ids to numbers")
        for t, v in self.logit_bias.items():
            if not isinstance(t, int) or isinstance(t, bool):
                raise SamplingParamsError(f"logit_bias keys must be token ids, got {_show(t)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise SamplingParamsError(f"logit_bias[{_show(t)}] must be a number in [-100, 100], got {_show(v)}")
        if vocab_size is not None:
            for name in ("stop_token_ids", "logit_bias"):
                bad = next((t for t in getattr(self, name) if not 0 <= t < vocab_size), None)
                if bad is not None:
                    raise SamplingParamsError(f"{name}: token id {_show(bad)} is out of range [0, {vocab_size})")

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
        if isinstance(k, int) and not isinstance(k, bool):
            t = k
        elif isinstance(k, str) and _TOKEN_ID.fullmatch(k):
            t = int(k)
        else:  # not "4_2", " 42", "1.5", 1.5 or True, which int() would take
            raise SamplingParamsError(f"logit_bias keys must be token ids, got {_show(k)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise SamplingParamsError(f"logit_bias[{t}] must be a number in [-100, 100], got {_show(v)}")
        out[t] = float(v)
    return out


def _is_finite(v: float | int) -> bool:
    """math.isfinite, False for an int too large for a float instead of OverflowError."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _show(v: Any) -> str:
    """A short repr for an error message: a hostile value may be 8 MB long, or an integer too
    large for str() (Python refuses more than 4300 digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
