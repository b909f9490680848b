"""Forced tool calls through the real `openai` client: `tool_choice="required"` over five tool
schemas, every returned call's arguments parsed and validated against its function's schema.

Starts `radixflow serve` on the default model (or uses --url), sends --requests chat completions
(8 at a time, temperature 0.8, one of five tool sets each) and prints, per schema and in all:
requests, calls returned, arguments that parse, arguments that validate, requests with no call
(a call cut by max_tokens), and latency p50 / p99.

    python benchmarks/tool_calls.py                 # 200 requests
    python benchmarks/tool_calls.py --requests 20   # quick
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import statistics
import sys
import time

import jsonschema
import openai
from local_server import serve_argv, start, stop
from soak import cpu_line

TOOLS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False},
    "add": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                             "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False},
    "search_web": {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 40},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["query"]},
    "create_event": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30}, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
        "required": ["title", "date"], "additionalProperties": False},
    "set_options": {"type": "object", "properties": {"options": {"type": "object", "properties": {
        "verbose": {"type": "boolean"}, "level": {"type": "string", "enum": ["low", "medium", "high"]}},
        "required": ["verbose", "level"], "additionalProperties": False}},
        "required": ["options"], "additionalProperties": False},
}
QUESTIONS = {"get_weather": "Is it raining in Berlin right now?", "add": "What is 17 plus 25?",
             "search_web": "Find recent news about solar panels.",
             "create_event": "Book a team lunch on 2026-12-10 with Ann and Bo.",
             "set_options": "Turn on verbose logging at a high level."}


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name.replace('_', ' ')}",
                                             "parameters": TOOLS[name]}}


def one(client: openai.OpenAI, name: str, seed: int) -> tuple[str, list, float]:
    # Each request offers its own tool and one other, so the model has to choose.
    other = list(TOOLS)[(list(TOOLS).index(name) + 1) % len(TOOLS)]
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTIONS[name]}],
                                       tools=[tool(name), tool(other)], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0.8, seed=seed, max_tokens=96)
    return name, r.choices[0].message.tool_calls or [], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--api-key", default="bench")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start(serve_argv(["--api-key", args.api_key, "--log-level", "warning"]))
    client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies = []
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(one, client, list(TOOLS)[i % len(TOOLS)], i) for i in range(args.requests)]
            for job in concurrent.futures.as_completed(jobs):
                asked, calls, dt = job.result()
                latencies.append(dt)
                stats[asked]["requests"] += 1
                stats[asked]["no call"] += not calls
                for c in calls:
                    s = stats[c.function.name]
                    s["calls"] += 1
                    try:
                        arguments = json.loads(c.function.arguments)
                        s["parse"] += 1
                        jsonschema.validate(arguments, TOOLS[c.function.name])
                        s["valid"] += 1
                    except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                        print(f"INVALID {c.function.name}: {c.function.arguments!r}: {e}", file=sys.stderr)
    finally:
        if proc is not None:
            stop(proc, 30)
    wall = time.perf_counter() - t0
    print(cpu_line())
    print(f"{args.requests} chat completions, tool_choice=required, temperature 0.8, 8 concurrent, {wall:.1f} s\n")
    cols = ["requests", "calls", "parse", "valid", "no call"]
    print(f"| tool | {' | '.join(cols)} |\n|---|{'---:|' * len(cols)}")
    total: collections.Counter = collections.Counter()
    for name in TOOLS:
        total.update(stats[name])
        print(f"| {name} | {' | '.join(str(stats[name][c]) for c in cols)} |")
    print(f"| **all** | {' | '.join(str(total[c]) for c in cols)} |")
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    print(f"\nlatency p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
