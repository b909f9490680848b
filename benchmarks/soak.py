"""Soak test: many requests of every kind against one real `radixflow serve` with a small KV pool.

The mix: native /generate (plain, n > 1, JSON-schema and regex constrained), streams over the
native and OpenAI APIs (a third of the streaming clients walk away mid-stream), OpenAI chat with
response_format, a sprinkle of hostile inputs (NaN temperature, NaN / overflowing logit_bias, a
lone surrogate, a 10,000-deep body, an unresolvable $ref), and DSL programs with forks through
`rf.RuntimeEndpoint`, all concurrently.

Prints requests by kind and outcome, leaked KV slots (must be 0), server restarts (must be 0),
the servers' resident memory after warm-up and at the end (growth must stay under 5%), and p50 /
p99 latency of the completed requests.

    python benchmarks/soak.py                    # 10,000 requests, 2,048-token KV pool
    python benchmarks/soak.py --requests 500     # quick
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import platform
import random
import subprocess
import tempfile
import threading
import time
from typing import Any

import httpx
import psutil
from local_server import serve_argv, start
from local_server import stop as stop_server

import radixflow as rf

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
BAD_BODIES: list[tuple[str, bytes]] = [
    ("/generate", b'{"text": "Hi", "sampling_params": {"temperature": NaN}}'),
    ("/generate", b'{"text": "Hi", "sampling_params": {"temperature": 1e999}}'),
    ("/generate", b'{"text": "Hi", "sampling_params": {"logit_bias": {"42": "nan"}}}'),
    ("/generate", b'{"text": "Hi", "sampling_params": {"logit_bias": {"42": 1e39}}}'),
    ("/generate", b'{"text": "Hi", "sampling_params": {"seed": 1000000000000000000000000000000}}'),
    ("/generate", b'{"text": "Hi \\ud800", "sampling_params": {"max_new_tokens": 2}}'),
    ("/generate", b"[" * 10000 + b"]" * 10000),
    ("/generate", b'{"text": "Hi", "sampling_params": {"json_schema": "{\\"$ref\\": \\"#/definitions/nope\\"}"}}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"42": NaN}}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}'),
]


def cpu_line() -> str:
    """The CPU model and its SIMD flags of interest (benchmarks print them next to their tables)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), model)
        flags = set(next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith("flags")), "").split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return f"CPU: {model}; flags: {' '.join(simd) or 'none of avx2/avx512'}; cores: {psutil.cpu_count()}"


def launch(args: argparse.Namespace, log: Any) -> tuple[subprocess.Popen, str]:
    """Start the server, its log going to `log`; (process, URL) once it is ready."""
    return start(serve_argv(["--log-level", "warning", "--max-total-tokens", str(args.pool), "--max-running-requests",
                             str(args.max_running), "--log-interval", "0", "--max-n", "4"], args.model), stderr=log)


def server_procs(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    root = psutil.Process(proc.pid)
    return {p.pid: p for p in [root, *root.children(recursive=True)]}


def rss_mb(procs: dict[int, psutil.Process]) -> float:
    return sum(p.memory_info().rss for p in procs.values()) / 2**20


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency: list[float] = []
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, kind: str, outcome: str, latency: float | None = None, detail: str = "") -> None:
        self.counts[(kind, outcome)] += 1
        if latency is not None:
            self.latency.append(latency)
        if outcome == "FAILED" and (kind, outcome) not in self.examples:
            self.examples[(kind, outcome)] = detail[:300]


def request_for(i: int, rng: random.Random) -> tuple[str, str, dict[str, Any] | bytes, bool]:
    """(kind, path, body, stream) of request i."""
    topic = rng.choice(["cats", "the sea", "Paris", "prime numbers", "a robot", "tea", "winter"])
    greedy = rng.random() < 0.5
    sp: dict[str, Any] = {"max_new_tokens": rng.randint(2, 12), "temperature": 0.0 if greedy else 0.8}
    r = rng.random()
    if r < 0.04:
        path, raw = rng.choice(BAD_BODIES)
        return "bad input", path, raw, False
    if r < 0.20:
        return "native", "/generate", {"text": f"Write about {topic} ({i}).", "sampling_params": sp}, False
    if r < 0.28:
        return "native n=2", "/generate", {"text": f"Name a color for {topic}:",
                                           "sampling_params": {**sp, "n": 2, "temperature": 0.9}}, False
    if r < 0.36:
        sp = {**sp, "max_new_tokens": 16, "json_schema": json.dumps(SCHEMA)}
        return "json schema", "/generate", {"text": f"Is {topic} nice? Answer in JSON:", "sampling_params": sp}, False
    if r < 0.42:
        sp = {**sp, "regex": "(yes|no), [0-9]{1,3}"}
        return "regex", "/generate", {"text": f"Do you like {topic}? Answer:", "sampling_params": sp}, False
    if r < 0.66:
        return "native stream", "/generate", {"text": f"A story about {topic}:", "stream": True,
                                              "sampling_params": {**sp, "max_new_tokens": rng.randint(4, 16)}}, True
    msgs = [{"role": "user", "content": f"Tell me one fact about {topic}."}]
    if r < 0.90:
        return "chat stream", "/v1/chat/completions", {"messages": msgs, "stream": True, "max_tokens": 12,
                                                       "temperature": sp["temperature"]}, True
    body = {"messages": msgs, "max_tokens": 16, "temperature": sp["temperature"],
            "response_format": {"type": "json_schema", "json_schema": {"name": "fact", "schema": SCHEMA}}}
    return "chat json", "/v1/chat/completions", body, False


def check_result(kind: str, body: Any) -> str | None:
    """What is wrong with a 200 answer, or None."""
    if kind in ("json schema", "chat json"):
        items = body if isinstance(body, list) else [body]
        for item in items:
            if "choices" in item:
                text, finish = item["choices"][0]["message"]["content"], item["choices"][0]["finish_reason"]
            else:
                text, finish = item["text"], item["meta_info"]["finish_reason"]["type"]
            if finish == "stop":
                value = json.loads(text)
                if set(value) != {"ok"} or not isinstance(value["ok"], bool):
                    return f"output breaks the schema: {text!r}"
    return None


async def one(client: httpx.AsyncClient, i: int, rng: random.Random, tally: Tally) -> None:
    kind, path, body, stream = request_for(i, rng)
    t0 = time.perf_counter()
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    try:
        if not stream:
            r = await client.post(path, **kw)
            if kind == "bad input":
                tally.add(kind, "refused 4xx" if 400 <= r.status_code < 500 else "FAILED", None,
                          f"{r.status_code} {r.text}")
                return
            if r.status_code != 200:
                tally.add(kind, "FAILED", None, f"{r.status_code} {r.text}")
                return
            problem = check_result(kind, r.json())
            tally.add(kind, "FAILED" if problem else "ok", time.perf_counter() - t0, problem or "")
            return
        walk_away = rng.random() < 1 / 3
        async with client.stream("POST", path, **kw) as r:
            if r.status_code != 200:
                tally.add(kind, "FAILED", None, f"{r.status_code} {await r.aread()}")
                return
            events = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if walk_away and events >= rng.randint(1, 3):
                        tally.add(kind, "disconnected")
                        return
                    if '"error"' in line[:20]:
                        tally.add(kind, "FAILED", None, line)
                        return
            tally.add(kind, "ok", time.perf_counter() - t0)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        tally.add(kind, "FAILED", None, f"{type(e).__name__}: {e}")


@rf.function
def forked_program(s, topic):
    s += rf.system("You are brief.")
    s += rf.user(f"Give two ideas about {topic}.")
    forks = s.fork(2)
    forks += lambda i: rf.assistant(f"Idea {i + 1}:" + rf.gen("idea", max_tokens=6, temperature=0.7))
    forks.join()
    s += rf.assistant("Best: " + rf.select("best", ["first", "second"]))


def dsl_worker(url: str, n: int, tally: Tally, stop: threading.Event) -> None:
    backend = rf.RuntimeEndpoint(url)
    rng = random.Random(7)
    for i in range(n):
        if stop.is_set():
            return
        t0 = time.perf_counter()
        try:
            state = forked_program.run(topic=rng.choice(["owls", "bridges", "soup"]) + f" {i}", backend=backend)
            ok = state["best"] in ("first", "second") and len(state["idea"]) == 2
            tally.add("dsl fork program", "ok" if ok else "FAILED", time.perf_counter() - t0, str(state))
        except Exception as e:  # a failed program is a finding to count, not a reason to stop
            tally.add("dsl fork program", "FAILED", None, f"{type(e).__name__}: {e}")


async def drive(url: str, args: argparse.Namespace, tally: Tally, on_progress) -> None:
    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        async def bounded(i: int) -> None:
            async with sem:
                await one(client, i, rng, tally)
                on_progress(i)

        await asyncio.gather(*(bounded(i) for i in range(args.requests)))


def pool_state(client: httpx.Client, timeout: float = 120.0) -> dict[str, Any] | None:
    """The scheduler's info once nothing runs or waits (None if the server cannot tell)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = client.get("/get_server_info")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        info = r.json()
        if (info["num_running"] == 0 and info["num_waiting"] == 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="HTTP requests sent by the load (default 10000)")
    ap.add_argument("--pool", type=int, default=2048, help="KV pool size in tokens (default 2048)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    ap.add_argument("--max-running", type=int, default=32, help="the server's --max-running-requests")
    ap.add_argument("--programs", type=int, default=None, help="DSL programs (default: requests / 100)")
    ap.add_argument("--warmup", type=int, default=None, help="requests before the RSS baseline (default: a tenth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    programs = args.requests // 100 if args.programs is None else args.programs
    warmup = args.requests // 10 if args.warmup is None else args.warmup
    print(cpu_line())
    log = tempfile.NamedTemporaryFile("w+", prefix="radixflow-soak-", suffix=".log", delete=False)
    proc, url = launch(args, log)
    procs = server_procs(proc)
    pids = set(procs)
    tally = Tally()
    rss: dict[str, float] = {"start": rss_mb(procs)}

    def on_progress(i: int) -> None:
        if "after warm-up" not in rss and sum(tally.counts.values()) >= warmup:
            rss["after warm-up"] = rss_mb(procs)

    stop = threading.Event()
    t0 = time.perf_counter()
    try:
        dsl = threading.Thread(target=dsl_worker, args=(url, programs, tally, stop), daemon=True)
        dsl.start()
        asyncio.run(drive(url, args, tally, on_progress))
        dsl.join()
        wall = time.perf_counter() - t0
        with httpx.Client(base_url=url, timeout=60.0) as client:
            info = pool_state(client)
            alive = proc.poll() is None and all(p.is_running() for p in procs.values())
            now = server_procs(proc) if proc.poll() is None else {}
            restarts = len(set(now) ^ pids) + (0 if alive else 1)
            rss["end"] = rss_mb(procs) if alive else float("nan")
            try:
                health = client.get("/health").status_code
            except httpx.HTTPError as e:
                health = type(e).__name__
    finally:
        stop.set()
        stop_server(proc, 30)
    if info is None:
        leaked: int | str = "unknown (the server did not answer)"
        info = {"num_running": "?", "num_waiting": "?", "retractions": "?"}
    else:
        leaked = info["pool_size"] - info["free_slots"] - info["evictable_slots"] - info["protected_slots"]
    print(f"\n{args.requests} requests + {programs} DSL programs (each a fork of 2 and a select), "
          f"concurrency {args.concurrency}, KV pool {args.pool} tokens, {wall:.0f} s\n")
    print("| kind | outcome | count |\n|---|---|---:|")
    for (kind, outcome), n in sorted(tally.counts.items()):
        print(f"| {kind} | {outcome} | {n} |")
    failed = sum(n for (_, o), n in tally.counts.items() if o == "FAILED")
    base = rss.get("after warm-up", rss["start"])
    growth = (rss["end"] - base) / base * 100
    print(f"\nfailed: {failed}")
    print(f"leaked KV slots: {leaked} (running {info['num_running']}, waiting {info['num_waiting']}, "
          f"retractions {info['retractions']})")
    print(f"server restarts: {restarts}; /health after the run: {health}")
    print("resident memory (all server processes): " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
          + f"; growth after warm-up {growth:+.1f}%")
    print(f"latency of completed requests: p50 {pct(tally.latency, 50) * 1e3:.0f} ms, "
          f"p99 {pct(tally.latency, 99) * 1e3:.0f} ms")
    for key, detail in tally.examples.items():
        print(f"first failure of {key[0]}: {detail}")
    log.seek(0)
    tail = log.read()[-3000:]
    print(f"server log: {log.name}" + (f", its tail:\n{tail}" if failed or restarts else ""))
    return 0 if failed == 0 and leaked == 0 and restarts == 0 and growth < 5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
