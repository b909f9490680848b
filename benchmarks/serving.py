"""Serving benchmark in the style of SGLang's bench_serving: launch `radixflow serve`, drive it
with an async httpx client over streaming /generate, and sweep the concurrency.

Workloads (token ids, greedy, ignore_eos so every request makes exactly --output-len tokens):
  random         every prompt is --input-len random tokens (nothing to share)
  shared-prefix  --groups system prompts of --prefix-len tokens, each request adds --suffix-len
                 own tokens (the radix cache should serve the prefix)

Reports output throughput, request throughput, TTFT and inter-token latency p50/p99 and the
prefix-cache hit rate (cached / prompt tokens) per concurrency level, then runs the offline
Engine in-process on the same workload at concurrency 16 for the server/offline ratio.

    python benchmarks/serving.py                      # full sweep
    python benchmarks/serving.py --num-requests 8 --concurrency 1,4   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from local_server import running, serve_argv


@dataclass
class ReqResult:
    ok: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0


@dataclass
class RunResult:
    workload: str
    mode: str
    concurrency: int
    results: list[ReqResult]
    wall: float

    def row(self) -> dict:
        ok = [r for r in self.results if r.ok]
        out = sum(r.output_tokens for r in ok)
        itls = [x for r in ok for x in r.itls]
        ttfts = [r.ttft for r in ok]
        prompt = sum(r.prompt_tokens for r in ok)
        return {"workload": self.workload, "mode": self.mode, "conc": self.concurrency,
                "ok": f"{len(ok)}/{len(self.results)}", "out_tok_s": out / self.wall,
                "req_s": len(ok) / self.wall, "ttft_p50": _pct(ttfts, 50) * 1e3, "ttft_p99": _pct(ttfts, 99) * 1e3,
                "itl_p50": _pct(itls, 50) * 1e3, "itl_p99": _pct(itls, 99) * 1e3,
                "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0}


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def make_workload(name: str, n: int, args: argparse.Namespace, rng: random.Random) -> list[list[int]]:
    lo, hi = 100, 30000  # ordinary (non-special) token ids of the default vocabulary
    if name == "random":
        return [[rng.randrange(lo, hi) for _ in range(args.input_len)] for _ in range(n)]
    if name == "shared-prefix":
        prefixes = [[rng.randrange(lo, hi) for _ in range(args.prefix_len)] for _ in range(args.groups)]
        return [prefixes[i % args.groups] + [rng.randrange(lo, hi) for _ in range(args.suffix_len)] for i in range(n)]
    raise ValueError(f"unknown workload {name!r}")


# ---- the server ---------------------------------------------------------------------------------


def server_argv(args: argparse.Namespace) -> list[str]:
    return serve_argv(["--log-level", "warning", "--max-total-tokens", str(args.max_total_tokens),
                       "--max-running-requests", str(args.max_running_requests), "--log-interval", "0"], args.model)


async def timed(metas: AsyncIterator[dict], t0: float) -> ReqResult:
    """One streamed request's result from its chunks' meta_info (sent at `t0`): TTFT at the first
    token, then each chunk's wait spread evenly over the tokens it adds (ITL); ok if it ran to
    its length, as ignore_eos asks."""
    res = ReqResult(ok=False)
    last, seen = t0, 0
    async for meta in metas:
        now = time.perf_counter()
        n = meta["completion_tokens"]
        if n > seen:
            if seen == 0:
                res.ttft = now - t0
            else:
                res.itls.extend([(now - last) / (n - seen)] * (n - seen))
            seen, last = n, now
        if meta["finish_reason"] is not None:
            res.ok = meta["finish_reason"]["type"] == "length"
            res.prompt_tokens, res.cached_tokens, res.output_tokens = meta["prompt_tokens"], meta["cached_tokens"], n
    res.e2e = time.perf_counter() - t0
    return res


async def _sse_metas(r: httpx.Response) -> AsyncIterator[dict]:
    async for line in r.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])["meta_info"]


async def one_request(client: httpx.AsyncClient, ids: list[int], output_len: int) -> ReqResult:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}}
    t0 = time.perf_counter()
    async with client.stream("POST", "/generate", json=body) as r:
        if r.status_code != 200:
            return ReqResult(ok=False)
        return await timed(_sse_metas(r), t0)


async def run_server(url: str, workload: str, prompts: list[list[int]], conc: int, output_len: int) -> RunResult:
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        await client.post("/flush_cache")
        sem = asyncio.Semaphore(conc)

        async def bounded(ids: list[int]) -> ReqResult:
            async with sem:
                return await one_request(client, ids, output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return RunResult(workload, "server", conc, list(results), time.perf_counter() - t0)


# ---- the offline engine -------------------------------------------------------------------------


async def run_offline(engine, workload: str, prompts: list[list[int]], conc: int, output_len: int) -> RunResult:
    sem = asyncio.Semaphore(conc)
    params = {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}

    async def one(ids: list[int]) -> ReqResult:
        async with sem:
            t0 = time.perf_counter()
            chunks = engine.async_stream(input_ids=ids, sampling_params=params)
            return await timed((c["meta_info"] async for c in chunks), t0)

    engine.flush_cache()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return RunResult(workload, "offline", conc, list(results), time.perf_counter() - t0)


# ---- main ---------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    head = (f"{'workload':<14}{'mode':<9}{'conc':>5}{'ok':>9}{'out tok/s':>11}{'req/s':>8}"
            f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'hit':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workload']:<14}{r['mode']:<9}{r['conc']:>5}{r['ok']:>9}{r['out_tok_s']:>11.1f}{r['req_s']:>8.2f}"
              f"{r['ttft_p50']:>9.0f}m{r['ttft_p99']:>9.0f}m{r['itl_p50']:>8.0f}m{r['itl_p99']:>8.0f}m"
              f"{r['hit_rate']:>7.1%}")
    print("(latencies in ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-requests", type=int, default=64, help="requests per (workload, concurrency) run")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--workloads", default="random,shared-prefix")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--max-running-requests", type=int, default=64)
    ap.add_argument("--offline-concurrency", type=int, default=16)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    rng = random.Random(args.seed)
    prompts = {w: make_workload(w, args.num_requests, args, rng) for w in workloads}

    rows: list[dict] = []
    with running(server_argv(args)) as url:
        for w in workloads:
            asyncio.run(run_server(url, w, prompts[w][: min(4, args.num_requests)], 4, 4))  # warm-up
            for c in concs:
                run = asyncio.run(run_server(url, w, prompts[w], c, args.output_len))
                rows.append(run.row())
                print(f"  done: {w} server c={c}: {rows[-1]['out_tok_s']:.1f} tok/s", file=sys.stderr)

    if not args.skip_offline:
        from radixflow.runtime.engine import Engine

        with Engine(args.model, max_total_tokens=args.max_total_tokens,
                    max_running_requests=args.max_running_requests) as engine:
            for w in workloads:
                asyncio.run(run_offline(engine, w, prompts[w][: min(4, args.num_requests)], 4, 4))  # warm-up
                run = asyncio.run(run_offline(engine, w, prompts[w], args.offline_concurrency, args.output_len))
                rows.append(run.row())
                print(f"  done: {w} offline c={args.offline_concurrency}", file=sys.stderr)

    print(f"\nradixflow serving benchmark: {args.num_requests} requests/run, input {args.input_len} "
          f"(shared: {args.groups}x{args.prefix_len} + {args.suffix_len}), output {args.output_len}, "
          f"cpu_count={os.cpu_count()}")
    print_table(rows)
    for w in workloads:
        srv = next((r for r in rows if r["workload"] == w and r["mode"] == "server"
                    and r["conc"] == args.offline_concurrency), None)
        off = next((r for r in rows if r["workload"] == w and r["mode"] == "offline"), None)
        if srv and off:
            print(f"{w}: server/offline output throughput at concurrency {args.offline_concurrency}: "
                  f"{srv['out_tok_s'] / off['out_tok_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
