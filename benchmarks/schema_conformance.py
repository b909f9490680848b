"""Schema conformance: real-world JSON schemas through the server, per grammar backend and `auto`.

Schemas: every schema `check-jsonschema` vendors (dependabot, github-workflows, renovate, ...;
`pip install check-jsonschema` or `pip install -e .[bench]`) plus hard cases (allOf, oneOf,
if/then/else, not, uniqueItems, patternProperties, recursive $ref, format). For each backend mode
(`--grammar-backend xgrammar | llguidance | auto`) one server is started and every schema is sent
to `/generate` best-effort (`json_schema_strict: false`) at each temperature, all at once:

- `exact`: the report says every keyword is enforced (the request would run under the default
  strict policy); `inexact`: it compiles, but strict requests are refused (reasons tallied);
  `no compile`: refused with a 400 even best-effort (the reason is tallied too).
- outputs: `valid` / `invalid` by an independent jsonschema check of the text, `cut` = finish
  reason length; `exact but invalid, not cut` tests the exactness claims; `reported valid, fails
  check` must be 0.
- compile ms p50/p99: choosing the backend plus compiling, in this process, on fresh backends;
  mask us/token: the scheduler's mask fill (`fill_bitmasks`, a batch of one) per token, replaying
  the last mode's outputs through every mode's grammar in this process, each output cut to the
  prefix all modes accept (same tokens, same positions); per token the fastest of 5 interleaved
  rounds (load only adds time; the rounds are interleaved so it hits all modes alike). Applying
  the mask to the logits is the same kernel for all modes and is not counted.

    python benchmarks/schema_conformance.py [--limit 10] [--max-tokens 128] [--modes auto xgrammar]
        [--save outputs.json | --load outputs.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from local_server import running, serve_argv

HARD_CASES: dict[str, dict] = {
    "hard-allOf": {"type": "object", "additionalProperties": False, "required": ["name"],
                   "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
                   "allOf": [{"required": ["age"]}]},
    "hard-oneOf": {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"},
                                                                    {"type": "number", "minimum": 0}]}},
                   "required": ["v"], "additionalProperties": False},
    "hard-if-then-else": {"type": "object", "required": ["kind"], "additionalProperties": False,
                          "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                          "if": {"properties": {"kind": {"const": "a"}}}, "then": {"required": ["n"]}},
    "hard-not": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9,
                                                        "not": {"const": 0}}},
                 "required": ["n"], "additionalProperties": False},
    "hard-uniqueItems": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3},
                         "uniqueItems": True, "minItems": 2, "maxItems": 4},
    "hard-patternProperties": {"type": "object", "patternProperties": {"^x-[a-z]+$": {"type": "integer"}},
                               "additionalProperties": False, "minProperties": 1, "maxProperties": 3},
    "hard-recursive-ref": {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "additionalProperties": False, "required": ["v"],
        "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "maxItems": 2,
                                                          "items": {"$ref": "#/$defs/node"}}}}}},
    "hard-format": {"type": "object", "additionalProperties": False, "required": ["day", "mail", "id"],
                    "properties": {"day": {"type": "string", "format": "date"},
                                   "mail": {"type": "string", "format": "email"},
                                   "id": {"type": "string", "format": "uuid"}}},
}


def load_schemas(limit: int | None) -> list[tuple[str, dict]]:
    """check-jsonschema's vendored schemas (sorted by name), then the hard cases."""
    try:
        import check_jsonschema
    except ImportError:
        raise SystemExit("pip install check-jsonschema (or pip install -e .[bench])") from None
    vendor = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor"
    out = [(p.stem, json.loads(p.read_text())) for p in sorted(vendor.glob("*.json"))]
    out += list(HARD_CASES.items())
    return out[:limit] if limit else out


def server_argv(mode: str, args: argparse.Namespace) -> list[str]:
    """The server of one backend mode."""
    return serve_argv(["--log-level", "error", "--grammar-backend", mode, "--max-total-tokens", "16384",
                       "--max-running-requests", "32", "--log-interval", "0",
                       "--max-request-bytes", str(16 * 1024 * 1024)], args.model)


def independent_check(schema: dict, text: str) -> bool:
    """Whether text is JSON valid against schema (jsonschema, with its format checker)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        cls = jsonschema.Draft7Validator
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(value)


async def one(client: httpx.AsyncClient, name: str, schema: dict, temp: float, max_tokens: int) -> dict:
    prompt = f"Write a small example {name} document in JSON.\n"
    params = {"json_schema": schema, "json_schema_strict": False, "temperature": temp, "seed": 1,
              "max_new_tokens": max_tokens}
    r = await client.post("/generate", json={"text": prompt, "sampling_params": params})
    body = r.json()
    if r.status_code != 200:
        return {"name": name, "temp": temp, "error": body.get("error", {}).get("message", r.text)}
    meta = body["meta_info"]
    return {"name": name, "temp": temp, "grammar": meta.get("grammar"), "text": body["text"],
            "output_ids": body["output_ids"], "finish": (meta.get("finish_reason") or {}).get("type"),
            "valid": independent_check(schema, body["text"])}


async def run_mode(url: str, schemas: list[tuple[str, dict]], args: argparse.Namespace) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        jobs = [one(client, n, s, t, args.max_tokens) for n, s in schemas for t in args.temperatures]
        return await asyncio.gather(*jobs)


def _backends(model_path: str) -> dict[str, Any]:
    from radixflow.grammars.llguidance_backend import LLGuidanceBackend
    from radixflow.grammars.xgrammar_backend import XGrammarBackend

    tok = os.path.join(model_path, "tokenizer.json")
    vocab, eos = _vocab_and_eos(model_path)
    return {"xgrammar": XGrammarBackend(tok, vocab, eos), "llguidance": LLGuidanceBackend(tok, vocab, eos)}


def _compiled(backends: dict[str, Any], mode: str, spec: str) -> tuple[str, Any, Any] | None:
    """(backend chosen, backend, compiled grammar) for a best-effort request, or None."""
    from radixflow.grammars import GrammarError
    from radixflow.grammars.selection import choose_backend

    try:
        choice = choose_backend("json", spec, mode, strict=False)
        backend = backends[choice.backend]
        return choice.backend, backend, backend.get_compiled(backend.compile_async("json", spec), timeout=300)
    except GrammarError:
        return None


def compile_times(mode: str, schemas: list[tuple[str, dict]], model_path: str) -> list[float]:
    """ms per schema to choose the backend and compile, on fresh (uncached) backends."""
    from radixflow.grammars import selection
    from radixflow.grammars.llguidance_backend import llguidance_support

    selection.xgrammar_support.cache_clear()
    llguidance_support.cache_clear()
    backends = _backends(model_path)
    out = []
    for _, schema in schemas:
        t0 = time.perf_counter()
        if _compiled(backends, mode, json.dumps(schema)) is not None:
            out.append((time.perf_counter() - t0) * 1e3)
    for b in backends.values():
        b.shutdown()
    return out


def mask_times(modes: list[str], schemas: list[tuple[str, dict]], seqs: dict[str, list[list[int]]],
               model_path: str, rounds: int = 5) -> dict[str, dict[str, tuple[str, float, int]]]:
    """{mode: {schema: (backend, fill time in us, tokens)}}: the same token
    sequences replayed through each mode's choice, cut to the prefix every mode's grammar accepts
    (so each mode is timed on the same tokens at the same positions), rounds interleaved so load
    hits all alike."""
    backends = _backends(model_path)
    out: dict[str, dict[str, tuple[str, float, int]]] = {m: {} for m in modes}
    for name, schema in schemas:
        spec = json.dumps(schema)
        chosen = {m: c for m in modes if (c := _compiled(backends, m, spec)) is not None}
        common = [ids[:min(_accepted(b, c, ids) for _, b, c in chosen.values())] for ids in seqs.get(name, [])]
        best: dict[str, list[list[float]]] = {m: [[float("inf")] * len(ids) for ids in common] for m in chosen}
        for _ in range(rounds):
            for m, (_, backend, compiled) in chosen.items():
                for k, ids in enumerate(common):  # per token, the fastest round: load only ever adds
                    best[m][k] = list(map(min, best[m][k], _replay(backend, compiled, ids)))
        tokens = sum(len(ids) for ids in common)
        for m, (b, _, _) in chosen.items():
            if tokens:
                out[m][name] = (b, sum(map(sum, best[m])), tokens)
    for b in backends.values():
        b.shutdown()
    return out


def _accepted(backend: Any, compiled: Any, ids: list[int]) -> int:
    """How many of ids the grammar accepts (a jump-forward retokenization may split differently)."""
    m = backend.create_matcher(compiled)
    return next((i for i, t in enumerate(ids) if not m.accept_token(t)), len(ids))


def _replay(backend: Any, compiled: Any, ids: list[int]) -> list[float]:
    """us spent filling the mask before each token of ids, through the scheduler's call
    (``fill_bitmasks`` of a batch of one); the tokens must all be accepted."""
    m = backend.create_matcher(compiled)
    mask = backend.allocate_bitmask(1)
    out = []
    for t in ids:
        t0 = time.perf_counter()
        backend.fill_bitmasks([(m, 0)], mask)
        out.append((time.perf_counter() - t0) * 1e6)
        m.accept_token(t)
    return out


def _vocab_and_eos(model_path: str) -> tuple[int, list[int]]:
    cfg = json.loads(Path(model_path, "config.json").read_text())
    eos = cfg.get("eos_token_id", 2)
    return cfg["vocab_size"], eos if isinstance(eos, list) else [eos]


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def summarize(mode: str, n_schemas: int, results: list[dict], compile_ms: list[float],
              mask: dict[str, tuple[str, float, int]]) -> tuple[dict, collections.Counter]:
    """One table row, and the reasons (per schema) why schemas are not exact or do not compile."""
    reasons: collections.Counter = collections.Counter()
    per_schema: dict[str, str] = {}
    for r in results:
        if r["name"] in per_schema:
            continue
        if "error" in r:
            per_schema[r["name"]] = "no compile"
            reasons["no compile: " + _reason(r["error"])] += 1
            continue
        g = r["grammar"] or {}
        per_schema[r["name"]] = "exact" if g.get("exact") else "inexact"
        for key in sorted({gap.split(" at ")[0] for gap in g.get("not_enforced", [])}):
            reasons[f"inexact ({g.get('backend')}): {key}"] += 1
    outs = [r for r in results if "error" not in r]
    chosen = collections.Counter((r["grammar"] or {}).get("backend") for r in outs if r["temp"] == results[0]["temp"])
    tokens = sum(v[2] for v in mask.values())
    row = {"mode": mode, "schemas": n_schemas,
           "exact": sum(v == "exact" for v in per_schema.values()),
           "inexact": sum(v == "inexact" for v in per_schema.values()),
           "no compile": sum(v == "no compile" for v in per_schema.values()),
           "outputs": len(outs), "valid": sum(r["valid"] for r in outs),
           "invalid": sum(not r["valid"] for r in outs), "cut": sum(r["finish"] == "length" for r in outs),
           "exact but invalid, not cut": sum((r["grammar"] or {}).get("exact") and not r["valid"]
                                             and r["finish"] != "length" for r in outs),
           "reported valid, fails check": sum(bool((r["grammar"] or {}).get("output_valid")) and not r["valid"]
                                              for r in outs),
           "compile p50/p99 ms": f"{_pct(compile_ms, 0.5):.0f}/{_pct(compile_ms, 0.99):.0f}",
           "mask us/tok": f"{sum(v[1] for v in mask.values()) / tokens:.1f}" if tokens else "-",
           "backends": " ".join(f"{k}:{v}" for k, v in sorted(chosen.items())) if mode == "auto" else ""}
    return row, reasons


def _reason(msg: str) -> str:
    msg = msg.split(": ", 1)[-1] if msg.startswith("invalid or unsupported") else msg
    return msg.split("\n")[0][:90]


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["xgrammar", "llguidance", "auto"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="only the first N schemas")
    ap.add_argument("--model", default=None)
    ap.add_argument("--save", default=None, help="write the servers' outputs to this JSON file")
    ap.add_argument("--load", default=None, help="tabulate outputs saved by --save instead of running servers")
    args = ap.parse_args(argv)
    from radixflow.runtime.loading.default_model import resolve_model_path

    model_path = str(resolve_model_path(args.model))
    schemas = load_schemas(args.limit)
    results: dict[str, list[dict]] = json.loads(Path(args.load).read_text()) if args.load else {}
    for mode in [] if args.load else args.modes:
        t0 = time.perf_counter()
        with running(server_argv(mode, args)) as url:
            results[mode] = asyncio.run(run_mode(url, schemas, args))
        print(f"[{mode}: {time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    if args.save:
        Path(args.save).write_text(json.dumps(results))
    seqs: dict[str, list[list[int]]] = collections.defaultdict(list)
    for r in results[args.modes[-1]]:  # the last mode's outputs, replayed through every mode's grammar
        if "output_ids" in r:
            seqs[r["name"]].append(r["output_ids"])
    masks = mask_times(args.modes, schemas, seqs, model_path)
    rows, reasons = [], {}
    for mode in args.modes:
        row, reasons[mode] = summarize(mode, len(schemas), results[mode], compile_times(mode, schemas, model_path),
                                       masks[mode])
        rows.append(row)
    print_table(rows)
    print()
    print_mask_times(masks)
    for mode, counter in reasons.items():
        print(f"\n{mode}: schemas not exact (by keyword) or not compiled (by reason)")
        for reason, n in counter.most_common(12):
            print(f"  {n:3d}  {reason}")
    return 0


def print_mask_times(times: dict[str, dict[str, tuple[str, float, int]]]) -> None:
    """Mask us/token per mode on the same tokens as xgrammar alone; auto split by its choice."""
    if "xgrammar" not in times:
        return
    for mode, per in times.items():
        groups = {"all": list(per)} if mode != "auto" else {
            b: [n for n, v in per.items() if v[0] == b] for b in ("xgrammar", "llguidance")}
        for group, names in groups.items():
            names = [n for n in names if n in times["xgrammar"]]
            if not names or mode == "xgrammar":
                continue
            mine = sum(per[n][1] for n in names) / sum(per[n][2] for n in names)
            xgr = sum(times["xgrammar"][n][1] for n in names) / sum(times["xgrammar"][n][2] for n in names)
            label = f"{mode} ({len(names)} schemas{'' if group == 'all' else ', those it runs on ' + group})"
            print(f"mask us/token, {label}: {mine:.1f} vs xgrammar alone {xgr:.1f} ({mine / xgr - 1:+.0%})")


if __name__ == "__main__":
    raise SystemExit(main())
