"""Choosing the grammar backend of one request: the one that enforces its spec exactly.

``choose_backend(kind, spec, mode, strict)``:

- ``mode`` is ``"xgrammar"``, ``"llguidance"`` or ``"auto"`` (xgrammar first, then llguidance).
- A JSON schema goes to the first candidate that compiles it and enforces every keyword exactly
  (:mod:`radixflow.grammars.schema_support`). If none does, a ``strict`` request is refused with
  a :class:`GrammarError` naming, per backend, the keywords not enforced; otherwise it runs
  best-effort on the candidate that drops the fewest keywords (xgrammar on a tie), and the
  choice says which keywords are not enforced.
- Other kinds (regex, ebnf, choices, structural_tag) go to the first candidate that accepts the
  spec; both backends enforce what they accept exactly.
- A spec no candidate accepts raises the first candidate's error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from radixflow.grammars.errors import GrammarError
from radixflow.grammars.schema_support import Support, describe, xgrammar_gaps

GRAMMAR_BACKENDS = ("auto", "xgrammar", "llguidance")


@dataclass(frozen=True)
class BackendChoice:
    """The backend a request runs on, and what it leaves unenforced (for the response)."""

    backend: str
    exact: bool
    not_enforced: tuple[str, ...] = ()
    approximated: tuple[str, ...] = ()

    def info(self, kind: str, spec: str) -> dict[str, Any]:
        """The report carried to the finished output (``spec`` is for the output check only)."""
        return {"backend": self.backend, "exact": self.exact, "not_enforced": list(self.not_enforced),
                "approximated": list(self.approximated), "kind": kind, "spec": spec}


@functools.lru_cache(maxsize=256)
def xgrammar_support(spec: str) -> Support:
    """What xgrammar does with the JSON schema ``spec``: its parse error, or its gaps."""
    from radixflow.grammars.schema_support import parse_schema
    from radixflow.grammars.xgrammar_backend import validate_grammar

    try:
        validate_grammar("json", spec)
    except GrammarError as e:
        return Support("xgrammar", error=str(e))
    gaps, approx = xgrammar_gaps(parse_schema(spec))
    return Support("xgrammar", not_enforced=tuple(gaps), approximated=tuple(approx))


def support(backend: str, spec: str) -> Support:
    """What ``backend`` does with the JSON schema ``spec`` (cached by spec)."""
    if backend == "xgrammar":
        return xgrammar_support(spec)
    from radixflow.grammars.llguidance_backend import llguidance_support

    return llguidance_support(spec)


def _validate(backend: str, kind: str, spec: str) -> None:
    if backend == "xgrammar":
        from radixflow.grammars.xgrammar_backend import validate_grammar

        validate_grammar(kind, spec)
    else:
        from radixflow.grammars.llguidance_backend import to_llguidance

        to_llguidance(kind, spec)


def choose_backend(kind: str, spec: str, mode: str = "auto", strict: bool = True) -> BackendChoice:
    """The backend for ``(kind, spec)``; see the module docstring. Raises :class:`GrammarError`."""
    if mode not in GRAMMAR_BACKENDS:
        raise ValueError(f"grammar backend must be one of {GRAMMAR_BACKENDS}, got {mode!r}")
    candidates = ["xgrammar", "llguidance"] if mode == "auto" else [mode]
    if kind != "json":
        errors = []
        for name in candidates:
            try:
                _validate(name, kind, spec)
            except GrammarError as e:
                errors.append(e)
                continue
            gaps = tag_schema_gaps(spec) if kind == "structural_tag" and name == "xgrammar" else ()
            return BackendChoice(name, exact=not gaps, not_enforced=gaps)
        raise errors[0]
    reports = []
    for name in candidates:
        s = support(name, spec)
        if s.exact:
            return BackendChoice(name, True, (), s.approximated)
        reports.append(s)
    usable = [s for s in reports if s.error is None]
    if not usable:
        raise GrammarError(reports[0].error)
    if strict:
        raise GrammarError(refusal_message(usable, mode))
    best = min(usable, key=lambda s: len(s.not_enforced))
    return BackendChoice(best.backend, False, best.not_enforced, best.approximated)


def tag_schema_gaps(spec: str) -> tuple[str, ...]:
    """xgrammar's gaps in the JSON schemas inside a structural tag (SGLang's structures, or
    xgrammar's ``{"type": "json_schema", "json_schema": ...}`` formats), reported, never refused:
    the tag's free text is not a schema to validate."""
    from radixflow.grammars.schema_support import parse_schema

    gaps: list[str] = []
    stack: list[tuple[str, Any]] = [("", parse_schema(spec))]
    while stack:
        where, node = stack.pop()
        if isinstance(node, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        schemas = [node.get(k) for k in ("schema", "parameters")] if "begin" in node else []
        schemas += [node.get("json_schema")] if node.get("type") == "json_schema" else []
        for schema in (x for x in schemas if isinstance(x, dict)):
            gaps += [f"{where.lstrip('.')}: {gap}" for gap in xgrammar_gaps(schema)[0]]
        stack.extend((f"{where}.{k}", v) for k, v in node.items() if isinstance(v, (dict, list))
                     and k not in ("schema", "parameters", "json_schema"))
    return tuple(sorted(gaps))


def refusal_message(reports: list[Support], mode: str) -> str:
    """Why a strict request is refused: each usable backend's unenforced keywords."""
    per = "; ".join(f"{s.backend} does not enforce {describe(s.not_enforced)}" for s in reports)
    who = "no grammar backend enforces" if mode == "auto" else f"the {mode} grammar backend does not enforce"
    return (f"json_schema cannot be enforced exactly ({who} all of its keywords): {per}. "
            'Send "json_schema_strict": false (OpenAI API: response_format.json_schema.strict = false) to run '
            "it best-effort, with the output validated against the whole schema and the result reported")
