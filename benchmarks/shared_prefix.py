"""Shared-prefix workloads with the radix cache on vs off, same run.

(a) 4 groups x 16 requests: an 800-token system prompt per group, ~60-token questions,
    16 output tokens; all 64 submitted at once.
(b) multi-turn chat: 16 conversations x 4 turns, each turn resending the whole history.
Reports throughput, mean time to first token, and the cache hit rate against the ideal hit
rate of the workload (every token of a prompt that an earlier prompt shares as a prefix,
computed by replaying the prompts actually sent).

    python benchmarks/shared_prefix.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

WORDS = ("system user data model token cache prefix share agent plan tool answer question memory branch "
         "search result value policy request batch engine fast reuse tree node").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def ideal_hits(sent: list[tuple[list[int], list[int]]]) -> int:
    """Tokens an infinite cache could serve: for each prompt (in submission order), the longest
    prefix shared with an earlier prompt + its output (at least one token is computed)."""
    import torch

    from radixflow.radix import RadixCache

    tree, nxt, total = RadixCache(lambda s: None), 1, 0
    for prompt, output in sent:
        total += min(tree.match_prefix(prompt).length, len(prompt) - 1)
        seq = prompt + output
        tree.insert(seq, torch.arange(nxt, nxt + len(seq)))
        nxt += len(seq)
    return total


async def _stream_one(eng, ids, params, t0, sent: list) -> tuple[float, str, int]:
    entry: tuple[list[int], list[int]] = (ids, [])
    sent.append(entry)
    ttft, text, n = None, "", 0
    async for chunk in eng.async_stream(input_ids=ids, sampling_params=params):
        if ttft is None:
            ttft = time.perf_counter() - t0
        text, n = chunk["text"], chunk["meta_info"]["completion_tokens"]
        entry[1][:] = chunk["output_ids"]
    return ttft, text, n


async def workload_a(eng, tok, rng: random.Random) -> dict:
    systems = [sentence(rng, 800) for _ in range(4)]
    reqs = []
    for g in range(4):
        sys_ids = tok.encode(systems[g])[:800]
        for _ in range(16):
            reqs.append(sys_ids + tok.encode(" Question: " + sentence(rng, 55))[:60])
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    sent: list = []
    t0 = time.perf_counter()
    res = await asyncio.gather(*[_stream_one(eng, ids, params, t0, sent) for ids in reqs])
    dt = time.perf_counter() - t0
    return {"time": dt, "ttft": sum(r[0] for r in res) / len(res), "out_tokens": sum(r[2] for r in res),
            "requests": len(reqs), "sent": sent}


async def workload_b(eng, tok, rng: random.Random) -> dict:
    sent: list = []
    ttfts: list[float] = []
    out_tokens = 0
    system = "You are a helpful assistant. " + sentence(rng, 120)
    questions = [[sentence(rng, 30) + "?" for _ in range(4)] for _ in range(16)]
    params = {"temperature": 0, "max_new_tokens": 24}

    async def conversation(c: int) -> None:
        nonlocal out_tokens
        msgs = [{"role": "system", "content": system}]
        for turn in range(4):
            msgs.append({"role": "user", "content": questions[c][turn]})
            ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
            t = time.perf_counter()
            ttft, text, n = await _stream_one(eng, ids, params, t, sent)
            ttfts.append(ttft)
            out_tokens += n
            msgs.append({"role": "assistant", "content": text})

    t0 = time.perf_counter()
    await asyncio.gather(*[conversation(c) for c in range(16)])
    return {"time": time.perf_counter() - t0, "ttft": sum(ttfts) / len(ttfts), "out_tokens": out_tokens,
            "requests": len(sent), "sent": sent}


def run(path: str, disable_cache: bool, which: str, seed: int) -> dict:
    from radixflow.runtime.engine import Engine

    with Engine(path, disable_radix_cache=disable_cache, max_running_requests=64, max_total_tokens=80000,
                max_prefill_tokens=4096, chunked_prefill_size=2048) as eng:
        eng.generate("warm up", {"max_new_tokens": 2})
        eng.flush_cache()
        fn = workload_a if which == "a" else workload_b
        res = asyncio.run(fn(eng, eng.tokenizer, random.Random(seed)))
        info = eng.get_server_info()
        res["hit_rate"] = info["cached_tokens"] / max(1, info["prompt_tokens"])
        res["prompt_tokens"] = info["prompt_tokens"]
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["a", "b"], default=None)
    args = ap.parse_args()
    from radixflow.runtime.loading.default_model import resolve_model_path

    path = resolve_model_path(None)
    print("| workload | cache | time (s) | req/s | output tok/s | mean TTFT (s) | hit rate | ideal hit rate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for which in ("a", "b"):
        if args.only and which != args.only:
            continue
        results = {}
        for off in (False, True):
            r = run(path, off, which, args.seed)
            ideal = ideal_hits(r["sent"]) / max(1, sum(len(p) for p, _ in r["sent"]))
            results[off] = r
            name = "(a) 4x16 shared 800-tok system" if which == "a" else "(b) 16 chats x 4 turns"
            print(f"| {name} | {'off' if off else 'on'} | {r['time']:.2f} | {r['requests'] / r['time']:.2f} | "
                  f"{r['out_tokens'] / r['time']:.1f} | {r['ttft']:.2f} | {r['hit_rate']:.1%} | {ideal:.1%} |",
                  flush=True)
        on, off = results[False], results[True]
        print(f"| {which}: speedup cache on/off | | {off['time'] / on['time']:.2f}x | | | "
              f"TTFT {off['ttft'] / on['ttft']:.2f}x lower | | |", flush=True)


if __name__ == "__main__":
    main()
