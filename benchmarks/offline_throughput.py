"""Offline throughput: radixflow's Engine vs Hugging Face `generate`, same workload, same run.

Workload: N requests of random token prompts (50-600 tokens) and output lengths (16-256,
ignore_eos). Hugging Face runs in batches of --batch-size (left-padded, each batch decoding to
its longest output); radixflow runs with max_running_requests = --batch-size. Throughput counts
only the requested output tokens. Also measures batch-1 decode speed of both. Each system runs
in its own fresh process with its own best settings (radixflow sets OMP_WAIT_POLICY=PASSIVE
on import and may pick OpenBLAS for its matmuls; Hugging Face keeps torch's defaults).

    python benchmarks/offline_throughput.py            # the full 200-request run
    python benchmarks/offline_throughput.py --num 48   # a quicker one
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

from steal import cpu_stolen, steal_between


def workload(num: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(50, 600))] for _ in range(num)]
    outs = [rng.randint(16, 256) for _ in range(num)]
    return prompts, outs


def run_radixflow(path: str, prompts, outs, batch: int) -> tuple[float, str]:
    from radixflow.runtime.engine import Engine

    with Engine(path, max_running_requests=batch, max_total_tokens=batch * 900 + 4096) as eng:
        eng.generate(input_ids=prompts[0][:20], sampling_params={"max_new_tokens": 4})  # warm-up
        eng.flush_cache()
        params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in outs]
        t = time.perf_counter()
        res = eng.generate(input_ids=prompts, sampling_params=params)
        dt = time.perf_counter() - t
        assert [r["meta_info"]["completion_tokens"] for r in res] == outs
        return dt, eng.scheduler.runner.gemm_backend


def run_hf(model, prompts, outs, batch: int) -> float:
    import torch

    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i:i + batch], outs[i:i + batch]
        L = max(map(len, ps))
        ids = torch.tensor([[0] * (L - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(os_), min_new_tokens=max(os_),
                           do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def batch1_decode_radixflow(path: str, n: int = 128) -> float:
    from radixflow.runtime.engine import Engine

    with Engine(path, max_running_requests=4, max_total_tokens=4096) as eng:
        eng.generate("Hello", {"max_new_tokens": 4})
        stream = eng.generate("Once upon a time", {"temperature": 0, "max_new_tokens": n, "ignore_eos": True},
                              stream=True)
        next(stream)
        t = time.perf_counter()
        last = None
        for chunk in stream:
            last = chunk
        dt = time.perf_counter() - t
        return (last["meta_info"]["completion_tokens"] - 1) / dt


def batch1_decode_hf(model, n: int = 128) -> float:
    import torch

    ids = torch.tensor([[6403, 1980, 253, 655]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return (n - 1) / (time.perf_counter() - t - prefill)


def measure(system: str, num: int, batch: int, seed: int) -> dict:
    """Run one system in this process; returns {"dt": seconds, "batch1": tok/s, "info": str}."""
    if system == "radixflow":
        import radixflow  # noqa: F401  (before torch: its thread settings)
    import torch

    from radixflow.runtime.loading.default_model import resolve_model_path

    path = resolve_model_path(None)
    prompts, outs = workload(num, seed)
    if system == "radixflow":
        dt, gemm = run_radixflow(path, prompts, outs, batch)
        return {"dt": dt, "batch1": batch1_decode_radixflow(path), "info": f"{gemm} matmuls"}
    import transformers

    from radixflow.runtime.loading.default_model import ensure_fp32_weights

    hf = transformers.AutoModelForCausalLM.from_pretrained(ensure_fp32_weights(path), dtype=torch.float32).eval()
    return {"dt": run_hf(hf, prompts, outs, batch), "batch1": batch1_decode_hf(hf),
            "info": f"torch {torch.__version__}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--system", choices=["radixflow", "hf"], help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args.num, args.batch_size, args.seed)))
        return

    prompts, outs = workload(args.num, args.seed)
    n_out, n_in = sum(outs), sum(map(len, prompts))
    print(f"workload: {args.num} requests, {n_in} prompt tokens, {n_out} output tokens, "
          f"batch size {args.batch_size}")
    rows = []
    for system, name in [("radixflow", "radixflow"), ("hf", "HF transformers generate")]:
        if system == "hf" and args.skip_hf:
            continue
        cmd = [sys.executable, __file__, "--system", system, "--num", str(args.num),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
        s0 = cpu_stolen()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        steal = steal_between(s0, cpu_stolen())
        r = json.loads(out.strip().splitlines()[-1])
        rows.append((name, r["dt"], r["batch1"], "n/a" if steal is None else f"{steal:.0%}", r["info"]))
    print()
    print("| system | time (s) | output tok/s | total tok/s | batch-1 decode tok/s | CPU steal | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, dt, b1, steal, info in rows:
        print(f"| {name} | {dt:.1f} | {n_out / dt:.1f} | {(n_in + n_out) / dt:.1f} | {b1:.1f} | {steal} | {info} |")
    print("CPU steal: the share of CPU time the hypervisor gave to other guests during that system's run")
    if len(rows) == 2:
        print(f"\nthroughput ratio radixflow / HF: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
