"""Cache-aware routing vs round-robin vs random over 4 workers, and one worker serving everything.

Workload: 16 prefix groups x 8 requests. Each group has its own system prompt (~--prefix-words
words); each request adds its own question and asks for --max-new-tokens tokens. Requests arrive
interleaved: round r sends request r of every group, groups in a shuffled order, with
--concurrency requests in flight. Before each run every worker's prefix cache is flushed.

The cache hit rate is what the workers report (meta_info.cached_tokens / prompt_tokens, summed
over the requests), never the router's guess; computed prompt tokens are the prompt tokens the
workers actually prefilled. The workers are `radixflow serve --dp-size 4`; each policy runs
behind its own `radixflow router --policy P` over those workers.

    python benchmarks/router.py [--prefix-words 160] [--max-new-tokens 4] [--concurrency 8]

Each worker's pool (--max-total-tokens, default 1536) holds a quarter of the groups' prefixes
but not all of them; the single worker gets the fleet's whole memory (4 x 1536), so it compares
cache-aware routing over four caches with one cache of the same total size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any

import httpx
from local_server import ROUTER_READY, running, serve_argv

WORDS = ("system user data model token cache prefix share agent plan tool answer question memory branch "
         "search result value policy request batch engine fast reuse tree node").split()
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


ENV = {**os.environ, "RADIXFLOW_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}


def workload(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    prefixes = [f"Group {g}. " + " ".join(rng.choice(WORDS) for _ in range(args.prefix_words))
                for g in range(args.groups)]
    prompts = []
    for r in range(args.per_group):
        order = list(range(args.groups))
        rng.shuffle(order)
        for g in order:
            question = " ".join(rng.choice(WORDS) for _ in range(12))
            prompts.append(f"{prefixes[g]}\nQuestion {r}: {question}?\nAnswer:")
    return prompts


async def run(url: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    sem = asyncio.Semaphore(args.concurrency)
    metas: list[dict[str, Any]] = []

    async def one(client: httpx.AsyncClient, text: str) -> None:
        async with sem:
            r = await client.post("/generate", json={"text": text, "sampling_params": {
                "max_new_tokens": args.max_new_tokens, "temperature": 0.0, "ignore_eos": True}})
            r.raise_for_status()
            metas.append(r.json()["meta_info"])

    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600.0, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - t0
    prompt = sum(m["prompt_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in metas)
    return {"hit_rate": cached / prompt, "computed": prompt - cached, "prompt": prompt,
            "req_s": len(metas) / wall, "tok_s": (prompt + sum(m["completion_tokens"] for m in metas)) / wall,
            "wall": wall}


def flush(urls: list[str]) -> None:
    for u in urls:
        for _ in range(100):
            if httpx.post(u + "/flush_cache", headers=AUTH, trust_env=False).status_code == 200:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{u} would not flush its cache")


def serve_and_run(opts: list[str], prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The workload on one `radixflow serve OPTS` (after a warm-up and a cache flush)."""
    with running(serve_argv(opts), env=ENV) as url:
        asyncio.run(run(url, prompts[:2], args))
        flush([url])
        return asyncio.run(run(url, prompts, args))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--prefix-words", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-total-tokens", type=int, default=1536,
                    help="each worker's KV pool (the single worker gets --workers times as much)")
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads per worker (4 workers share the cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prompts = workload(args)
    opts = ["--num-threads", str(args.num_threads), "--log-interval", "0", "--log-level", "warning"]
    rows = [("single worker", serve_and_run(["--max-total-tokens", str(args.workers * args.max_total_tokens),
                                             *opts], prompts, args))]
    with running(serve_argv(["--dp-size", str(args.workers), "--max-total-tokens", str(args.max_total_tokens),
                             *opts]), env=ENV) as dp_url:
        urls = [w["url"] for w in httpx.get(dp_url + "/list_workers", headers=AUTH, trust_env=False).json()["workers"]]
        for u in urls:
            asyncio.run(run(u, prompts[:2], args))  # warm-up (kernels, allocator)
        for policy in ("cache_aware", "round_robin", "random"):
            flush(urls)
            with running(["router", "--port", "0", "--policy", policy, "--log-level", "warning",
                          "--worker-urls", *urls], ready=ROUTER_READY, env=ENV) as url:
                rows.append((f"{args.workers} workers, {policy}", asyncio.run(run(url, prompts, args))))
    report(rows, args)
    return 0


def report(rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"{args.groups} groups x {args.per_group} requests, ~{args.prefix_words}-word prefixes, "
          f"{args.max_new_tokens} new tokens, concurrency {args.concurrency}\n")
    print("| routing | cache hit rate | computed prompt tokens | req/s | tok/s |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['hit_rate']:.3f} | {r['computed']} / {r['prompt']} | {r['req_s']:.2f} | "
              f"{r['tok_s']:.0f} |")
    res = dict(rows)
    single, aware, rr = (res["single worker"]["hit_rate"], res[f"{args.workers} workers, cache_aware"]["hit_rate"],
                         res[f"{args.workers} workers, round_robin"]["hit_rate"])
    print(f"\ncache-aware / single worker hit rate: {aware / single:.2f} (target >= 0.9); "
          f"cache-aware / round-robin: {aware / max(rr, 1e-9):.2f} (target >= 2)")


if __name__ == "__main__":
    sys.exit(main())
