"""Agent workloads through the DSL: radix cache on vs off, and DSL overhead vs direct engine calls.

Workloads (greedy, ignore_eos, so every configuration generates exactly the same token counts):
- tree-of-thought: `depth` levels of `width`-way forks (3 x 3: 3 + 9 + 27 = 39 gens);
- few-shot batch: run_batch of `batch` programs sharing a 5-shot prefix.
"direct" sends the same generation requests straight to the runtime engine (tree level by level,
the batch as one list), so dsl/direct is the DSL's overhead (threads, prefix commits, tracing).

Each configuration runs --repeat times with the cache on (--repeat-off times with it off),
interleaved with the others. On a shared VM the hypervisor's CPU steal makes single runs swing
by tens of percent (it is printed per configuration), and it only ever adds time: so the DSL
overhead is given from the fastest run of each mode (as timeit does), next to the ratio of the
medians and the ratio of each back-to-back pair.

    python benchmarks/agent_workloads.py [--max-tokens 8] [--batch 64] [--depth 3] [--width 3] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

from steal import cpu_stolen, steal_between

import radixflow as rf

# A tree-of-thought prompt carries the method's instructions and a worked example ahead of the
# task (as the Tree of Thoughts paper's propose prompts do); every node of the tree extends it.
QUESTION = (
    "You are a careful planner. Solve the task below one step at a time. At each step, propose one "
    "concrete next step that follows from the steps before it, state it in a single short sentence, "
    "and do not repeat an earlier step. Good steps are specific, cheap and easy to check; prefer "
    "free options, walking and public transport, and name places or actions rather than vague ideas.\n\n"
    "Example task: Plan a one-day visit to a mountain town on a small budget.\n"
    "Step 1, option 1: Take the early regional train, which costs less than the bus and arrives by nine.\n"
    "Step 2, option 1: Walk the marked trail to the lookout, which is free and takes two hours.\n"
    "Step 3, option 1: Eat a packed lunch at the lookout and buy dinner at the market before it closes.\n\n"
    "Task: Plan a three-day trip to a coastal city on a small budget. Consider transport, food, "
    "places to stay and free activities, and keep each step short.")
SHOTS = "".join(f"Q: What is the sum of {a} and {b}?\nA: The sum of {a} and {b} is {a + b}.\n\n"
                for a, b in ((12, 30), (7, 8), (101, 99), (45, 55), (3, 4)))


def step(level: int, i: int) -> str:
    return f"\nStep {level + 1}, option {i + 1}:"


@rf.function
def tree_of_thought(s, depth, width, max_tokens):
    s += QUESTION
    frontier = [s]
    for level in range(depth):
        nxt = []
        for node in frontier:
            forks = node.fork(width)
            forks += lambda i, level=level: step(level, i) + rf.gen("t", max_tokens=max_tokens)
            nxt.extend(forks)
        frontier = nxt
    return [leaf.text() for leaf in frontier]


def tree_direct(engine, depth: int, width: int, sp: dict) -> int:
    """The same gens as tree_of_thought, one batched call per level; returns the gen count."""
    frontier, gens = [QUESTION], 0
    for level in range(depth):
        prompts = [p + step(level, i) for p in frontier for i in range(width)]
        outs = engine.generate(prompts, sp)
        frontier = [p + o["text"] for p, o in zip(prompts, outs)]
        gens += len(prompts)
    return gens


@rf.function
def few_shot(s, question, max_tokens):
    s += "Answer each question in one sentence.\n\n" + SHOTS
    s += "Q: " + question + "\nA:" + rf.gen("a", max_tokens=max_tokens)


def questions(n: int) -> list[str]:
    return [f"What is the sum of {i * 7 % 90 + 10} and {i * 13 % 90 + 5}?" for i in range(n)]


def measure(eng: rf.Engine, fn) -> tuple[float, float | None, dict]:
    """(wall seconds, fraction of CPU time stolen meanwhile or None, token counters' deltas)."""
    ok, _ = eng.engine.flush_cache()
    assert ok, "cache flush refused"
    before = eng.get_server_info()
    s0 = cpu_stolen()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    s1 = cpu_stolen()
    after = eng.get_server_info()
    return wall, steal_between(s0, s1), {k: after[k] - before[k] for k in ("prompt_tokens", "computed_prompt_tokens")}


def bench(eng: rf.Engine, args: argparse.Namespace, cache: str, repeat: int) -> tuple[list[tuple], dict]:
    """Table rows and, per (workload, mode), the wall time of every run."""
    sp = {"max_new_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    n_tree = sum(args.width ** (k + 1) for k in range(args.depth))
    qs = questions(args.batch)
    runs = {
        ("tree-of-thought", "dsl"): lambda: tree_of_thought.run(depth=args.depth, width=args.width,
                                                                max_tokens=args.max_tokens, backend=eng,
                                                                temperature=0, ignore_eos=True),
        ("tree-of-thought", "direct"): lambda: tree_direct(eng.engine, args.depth, args.width, sp),
        ("few-shot batch", "dsl"): lambda: few_shot.run_batch([{"question": q} for q in qs], backend=eng,
                                                              max_tokens=args.max_tokens, temperature=0,
                                                              ignore_eos=True),
        ("few-shot batch", "direct"): lambda: eng.engine.generate(
            ["Answer each question in one sentence.\n\n" + SHOTS + "Q: " + q + "\nA:" for q in qs], sp),
    }
    walls: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    steals: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    deltas: dict[tuple[str, str], dict] = {}
    for _ in range(repeat):  # interleaved, so a noisy spell hits every configuration alike
        for key, fn in runs.items():
            wall, steal, deltas[key] = measure(eng, fn)
            walls[key].append(wall)
            if steal is not None:
                steals[key].append(steal)
    rows = []
    for (workload, mode), ws in walls.items():
        wall, d = statistics.median(ws), deltas[(workload, mode)]
        gens = n_tree if workload == "tree-of-thought" else args.batch
        hit = 1 - d["computed_prompt_tokens"] / max(d["prompt_tokens"], 1)
        st = steals[(workload, mode)]
        rows.append((workload, cache, mode, wall, min(ws), gens * args.max_tokens / wall,
                     statistics.mean(st) if st else None, d["prompt_tokens"], d["computed_prompt_tokens"], hit))
    return rows, walls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=3)
    p.add_argument("--repeat", type=int, default=7, help="runs of each cache-on configuration")
    p.add_argument("--repeat-off", type=int, default=2, help="runs of each cache-off configuration")
    args = p.parse_args()
    rows, walls = [], {}
    for cache, disable, repeat in (("on", False, args.repeat), ("off", True, args.repeat_off)):
        eng = rf.Engine(args.model, device=args.device, disable_radix_cache=disable, max_running_requests=64)
        eng.generate("warm up", {"max_new_tokens": 2})
        got, got_walls = bench(eng, args, cache, repeat)
        rows += got
        walls.update({(w, cache, m): ws for (w, m), ws in got_walls.items()})
        eng.shutdown()
    print(f"\nmax_tokens={args.max_tokens}  tree={args.depth}x{args.width}  batch={args.batch}  "
          f"repeat={args.repeat} (cache off: {args.repeat_off})  device={rows and eng.engine.config.resolved_device()}")
    head = ("workload", "cache", "mode", "wall s", "best s", "gen tok/s", "steal", "prompt tok", "computed",
            "cache hit")
    print(f"{head[0]:<16} {head[1]:>5} {head[2]:>6} {head[3]:>7} {head[4]:>7} {head[5]:>9} {head[6]:>6} "
          f"{head[7]:>10} {head[8]:>9} {head[9]:>9}")
    for w, c, m, wall, best, tps, steal, pt, ct, hit in rows:
        st = f"{steal:.0%}" if steal is not None else "n/a"
        print(f"{w:<16} {c:>5} {m:>6} {wall:>7.2f} {best:>7.2f} {tps:>9.1f} {st:>6} {pt:>10} {ct:>9} {hit:>9.1%}")
    print("wall s: median of the runs; best s: the fastest; steal: CPU time the hypervisor gave to other guests\n"
          "during the runs (mean), which is what makes wall times swing on a shared VM")
    med = {(r[0], r[1], r[2]): r[3] for r in rows}
    for w in ("tree-of-thought", "few-shot batch"):
        dsl, direct = walls[(w, "on", "dsl")], walls[(w, "on", "direct")]
        pairs = sorted(a / b for a, b in zip(dsl, direct))
        median_ratio = med[(w, "on", "dsl")] / med[(w, "on", "direct")]
        print(f"{w}: cache speedup (dsl) {med[(w, 'off', 'dsl')] / med[(w, 'on', 'dsl')]:.2f}x "
              f"(direct {med[(w, 'off', 'direct')] / med[(w, 'on', 'direct')]:.2f}x); DSL overhead vs direct "
              f"(cache on): best {min(dsl) / min(direct) - 1:+.1%}, median {median_ratio - 1:+.1%}, "
              f"back-to-back pairs {' '.join(f'{x:.2f}' for x in pairs)}")


if __name__ == "__main__":
    main()
