"""Which keywords of a JSON schema a grammar backend enforces exactly, and which it drops.

A grammar *enforces a schema exactly* when every text its matcher accepts validates against the
whole schema. (Narrower is allowed: xgrammar anchors ``pattern`` and forbids properties not
listed unless ``additionalProperties`` allows them; such outputs still validate.)

- xgrammar reports nothing, so its gaps come from a checked list (each entry is shown by a test
  in ``tests/test_schema_trust.py`` with an instance its matcher accepts and the schema forbids):
  it ignores ``allOf``, ``not``, ``if/then/else``, ``uniqueItems``, ``contains``,
  ``dependentRequired`` / ``dependentSchemas`` / ``dependencies``, ``unevaluated*``; reads
  ``oneOf`` as ``anyOf``; ignores the siblings of ``$ref``, the sibling ``type`` of ``enum`` /
  ``const``, and ``required`` names that ``properties`` does not list.
- llguidance reports what it does not implement when compiling leniently ("Unimplemented keys",
  "oneOf not fully supported, falling back to anyOf", "Unknown format"); each report is located
  in the schema by the same walk.

``format`` is enforced by both with regexes that can be looser than the validator (a date such
as 2021-02-30): it is listed as *approximated*, which does not make a schema inexact. A format the
run-time validator cannot check either is an annotation and is not listed.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
_SCHEMA_VALUES = ("additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then",
                  "else", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
# Keywords a validator asserts (draft 7 and 2020-12); anything else is an annotation or unknown,
# which validators ignore too (title, description, deprecationMessage, ...).
ASSERTIONS = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format", "maxItems", "minItems", "uniqueItems", "maxContains",
    "minContains", "maxProperties", "minProperties", "required", "dependentRequired", "properties",
    "patternProperties", "additionalProperties", "propertyNames", "items", "prefixItems", "additionalItems",
    "contains", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "dependencies",
    "unevaluatedItems", "unevaluatedProperties", "$ref", "$dynamicRef", "$recursiveRef"})

# Keywords xgrammar 0.2 ignores (its matcher accepts instances they forbid).
XGRAMMAR_IGNORED = frozenset({"allOf", "not", "if", "then", "else", "uniqueItems", "contains", "minContains",
                              "maxContains", "dependentRequired", "dependentSchemas", "dependencies",
                              "unevaluatedItems"})
XGRAMMAR_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                              "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
_LLG_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')
_LLG_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
MAX_LISTED = 12  # gaps named in a message


@dataclass(frozen=True)
class Support:
    """What one backend does with one schema.

    ``error``: why the backend cannot compile it at all (None if it can). ``not_enforced``:
    keywords it drops or approximates in a way that lets invalid output through, as
    ``"<keyword> at <JSON pointer>"``. ``approximated``: ``format`` checks done by a regex that
    can be looser than the validator's (does not make the schema inexact).
    """

    backend: str
    error: str | None = None
    not_enforced: tuple[str, ...] = ()
    approximated: tuple[str, ...] = field(default=())

    @property
    def exact(self) -> bool:
        return self.error is None and not self.not_enforced


def walk(schema: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema reachable from ``schema`` (following local ``$ref``s once each), as
    ``(JSON pointer, node)``; boolean subschemas and unresolvable references are skipped."""
    seen: set[str] = set()
    stack: list[tuple[str, Any]] = [("#", schema)]
    while stack:
        ptr, node = stack.pop()
        if not isinstance(node, dict) or ptr in seen:
            continue
        seen.add(ptr)
        yield ptr, node
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            target = resolve_pointer(schema, ref)
            if target is not None:
                stack.append((ref, target))
        stack.extend(_children(ptr, node))


def _children(ptr: str, node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            yield from ((f"{ptr}/{key}/{_escape(k)}", v) for k, v in node[key].items())
    for key in _SCHEMA_VALUES:
        if key in node:
            yield f"{ptr}/{key}", node[key]
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            yield from ((f"{ptr}/{key}/{i}", v) for i, v in enumerate(node[key]))
    items = node.get("items")
    if isinstance(items, list):
        yield from ((f"{ptr}/items/{i}", v) for i, v in enumerate(items))
    elif items is not None:
        yield f"{ptr}/items", items
    if isinstance(node.get("dependencies"), dict):
        yield from ((f"{ptr}/dependencies/{_escape(k)}", v) for k, v in node["dependencies"].items())


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def resolve_pointer(root: Any, ref: str) -> Any | None:
    """The node a local ``$ref`` (``#`` or ``#/...``) names, or None if it does not resolve."""
    target = root
    pointer = urllib.parse.unquote(ref[1:])
    for part in pointer[1:].split("/") if pointer else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and key in target:
            target = target[key]
        elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
            target = target[int(key)]
        else:
            return None
    return target


@functools.lru_cache(maxsize=1)
def checkable_formats() -> frozenset[str]:
    """Formats the run-time validator (jsonschema's format checker) asserts."""
    import jsonschema

    return frozenset(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)


def xgrammar_gaps(schema: Any) -> tuple[list[str], list[str]]:
    """(not enforced, approximated) for xgrammar, from the checked list; see the module docstring."""
    gaps: list[str] = []
    approx: list[str] = []
    formats = checkable_formats()
    for ptr, node in walk(schema):
        gaps += [f"{k} at {ptr}" for k in node if k in XGRAMMAR_IGNORED]
        if "oneOf" in node and not _disjoint(node["oneOf"], schema):
            gaps.append(f"oneOf at {ptr} (read as anyOf)")
        if "$ref" in node:
            gaps += [f"{k} at {ptr} (beside $ref)" for k in node if k != "$ref" and k in ASSERTIONS]
        if ("enum" in node or "const" in node) and "$ref" not in node and not _enum_within_siblings(node):
            gaps.append(f"{'enum' if 'enum' in node else 'const'} at {ptr} (its sibling keywords are ignored)")
        if isinstance(node.get("unevaluatedProperties"), dict):
            gaps.append(f"unevaluatedProperties at {ptr}")
        gaps += [f"required at {ptr} ({name!r} is not in properties)" for name in _unlisted_required(node)]
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt in formats:
            (approx if fmt in XGRAMMAR_FORMATS else gaps).append(f"format {fmt!r} at {ptr}")
    return gaps, approx


def _unlisted_required(node: dict[str, Any]) -> list[str]:
    """Required names xgrammar does not enforce: those ``properties`` does not list."""
    req = node.get("required")
    if not isinstance(req, list) or "$ref" in node:
        return []
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    return [r for r in req if isinstance(r, str) and r not in props]


def _enum_within_siblings(node: dict[str, Any]) -> bool:
    """Whether every enum/const value also satisfies the node's other keywords (xgrammar emits
    the values and ignores the rest)."""
    rest = {k: v for k, v in node.items() if k not in ("enum", "const") and k in ASSERTIONS}
    if not rest:
        return True
    values = node["enum"] if isinstance(node.get("enum"), list) else [node.get("const")]
    if any(k.startswith("$") or isinstance(v, (dict, list)) and k != "type" for k, v in rest.items()):
        return False  # nested subschemas: not checked here, so not claimed
    import jsonschema

    try:
        validator = jsonschema.Draft202012Validator(rest)
        return all(validator.is_valid(v) for v in values)
    except Exception:  # a malformed sibling: the backend or the validator reports it
        return False


def _disjoint(branches: Any, root: Any) -> bool:
    """Whether no instance can match two ``oneOf`` branches: pairwise disjoint ``type`` sets, or
    a property required by every branch with pairwise disjoint ``const`` / ``enum`` values."""
    if not isinstance(branches, list):
        return False
    nodes = [resolve_pointer(root, b["$ref"]) if isinstance(b, dict) and isinstance(b.get("$ref"), str)
             and b["$ref"].startswith("#") else b for b in branches]
    if not all(isinstance(n, dict) for n in nodes):
        return False
    types = [_types(n) for n in nodes]
    if all(types) and all(not (a & b) for i, a in enumerate(types) for b in types[i + 1:]):
        return True
    return _discriminated(nodes)


def _types(node: dict[str, Any]) -> set[str]:
    t = node.get("type")
    out = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    return out | {"number"} if "integer" in out else out | {"integer"} if "number" in out else out


def _discriminated(nodes: list[dict[str, Any]]) -> bool:
    required = [n.get("required") if isinstance(n.get("required"), list) else [] for n in nodes]
    common = set.intersection(*[{r for r in req if isinstance(r, str)} for req in required]) if nodes else set()
    for key in sorted(common):
        seen: list[Any] = []
        for n in nodes:
            props = n.get("properties")
            prop = props.get(key) if isinstance(props, dict) else None
            vals = _literal_values(prop)
            if vals is None or any(v in seen for v in vals):
                break
            seen += vals
        else:
            return True
    return False


def _literal_values(prop: Any) -> list[Any] | None:
    if isinstance(prop, dict) and "const" in prop:
        return [prop["const"]]
    if isinstance(prop, dict) and isinstance(prop.get("enum"), list):
        return list(prop["enum"])
    return None


def llguidance_gaps(schema: Any, warnings: list[str]) -> tuple[list[str], list[str]]:
    """(not enforced, approximated) for llguidance from its lenient-compile ``warnings``,
    located in ``schema`` by :func:`walk` where the warning names keywords."""
    nodes = list(walk(schema))
    gaps: list[str] = []
    formats = checkable_formats()
    for w in warnings:
        if m := _LLG_UNIMPLEMENTED.search(w):
            for key in json.loads(f"[{m.group(1)}]"):
                where = [ptr for ptr, node in nodes if key in node]
                gaps += [f"{key} at {ptr}" for ptr in where] or [key]
        elif m := _LLG_UNKNOWN_FORMAT.search(w):
            if m.group(1) in formats:
                gaps += [f"format {m.group(1)!r} at {ptr}" for ptr, n in nodes if n.get("format") == m.group(1)]
        elif "oneOf" in w:
            gaps += [f"oneOf at {ptr} (read as anyOf)" for ptr, n in nodes
                     if "oneOf" in n and not _disjoint(n["oneOf"], schema)] or ["oneOf (read as anyOf)"]
        else:
            gaps.append(w.split("\n")[0])
    approx = [f"format {n['format']!r} at {ptr}" for ptr, n in nodes
              if isinstance(n.get("format"), str) and n["format"] in formats
              and not any(g.startswith(f"format {n['format']!r}") for g in gaps)]
    return sorted(set(gaps), key=gaps.index), approx


def describe(gaps: tuple[str, ...] | list[str]) -> str:
    """The gaps as one line for an error message (at most MAX_LISTED named)."""
    shown = ", ".join(gaps[:MAX_LISTED])
    return shown + (f" and {len(gaps) - MAX_LISTED} more" if len(gaps) > MAX_LISTED else "")


@functools.lru_cache(maxsize=256)
def parse_schema(spec: str) -> Any:
    """``json.loads`` cached by text (the same schema is analysed by several steps)."""
    return json.loads(spec)
