"""radixflow against llama.cpp on the same GGUF, on the same machine, in the same run (CPU).

Workloads (greedy, fixed token counts):
- prefill of 512 and 8,000 tokens (time to the first token, tok/s);
- decode of 128 tokens at batch 1 (tok/s after the first token);
- 16 concurrent requests (64-token prompts, 128 tokens out each; total output tok/s);
- agent fan-out: 16 branches of 32 tokens from one 600-token shared prefix (total output tok/s).
Plus radixflow's decode-step time split (matmuls, attention, everything else) and its memory:
resident set after loading and after the runs, and the KV pool's size.

llama.cpp comes from `llama-cpp-python` when installed (in-process, one sequence: concurrent
requests and branches run one after another, reusing the cached prefix as it does), and/or from
binaries given by path: `--llama-bench` (prefill / decode rows) and `--llama-server` (started
with 16 slots; decode at batch 1, the concurrent and fan-out rows over HTTP, its resident memory
read from /proc). With `--llama-server`, `radixflow serve` runs the same three over HTTP too, and
those ratios compare the two servers. Without any, radixflow runs alone (in-process Engine).
Optional: never a test dependency.

    python benchmarks/cpu_peers.py [--gguf PATH] [--threads 2] [--quantization auto|none]
        [--kv-cache-dtype auto|float32] [--llama-bench PATH] [--llama-server PATH] [--skip-8k]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

from local_server import serve_argv, start, stop

# llama.cpp's binaries run with the environment as it was before radixflow's import, which sets
# OMP_WAIT_POLICY=PASSIVE for torch: llama.cpp's OpenMP threads would then sleep between its ops
# (decode at batch 1 measured 2.6x slower that way).
PEER_ENV = dict(os.environ)

import radixflow  # noqa: E402, F401  (sets OMP_WAIT_POLICY before torch loads; torch is imported in main)

PREFIX_WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree "
                "near the river bank and the wind moves slowly through the tall grass of the field ").split()


def cpu_line() -> str:
    """The CPU model and the SIMD flags that matter here, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = sorted(f for f in flags if re.match(r"(avx|amx|f16c|fma)", f))
    return f"CPU: {model}, {os.cpu_count()} logical cores; flags: {' '.join(keep)}"


def words(n: int, seed: int = 0) -> str:
    return " ".join(PREFIX_WORDS[(i * 7 + seed) % len(PREFIX_WORDS)] for i in range(n))


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- radixflow -----------------------------------------------------------------------------------


def radixflow_rows(args: argparse.Namespace, ids_for: Callable[[int], list[int]]) -> tuple[dict, dict]:
    from radixflow.runtime.engine import Engine

    eng = Engine(args.gguf, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                 num_threads=args.threads, max_running_requests=16, context_length=8192 + 256)
    runner = eng.scheduler.runner
    mem = {"after load": rss_mb()}
    g = {"temperature": 0, "ignore_eos": True}
    rows: dict[str, float] = {}
    try:
        eng.generate("warm up", {**g, "max_new_tokens": 4})
        for n in (512, 8000):
            if n == 8000 and args.skip_8k:
                continue
            eng.flush_cache()
            rows[f"prefill {n}"] = n / timed(lambda n=n: eng.generate(input_ids=ids_for(n),
                                                                   sampling_params={**g, "max_new_tokens": 1}))
        eng.flush_cache()
        t1 = timed(lambda: eng.generate(input_ids=ids_for(16), sampling_params={**g, "max_new_tokens": 1}))
        eng.flush_cache()
        t128 = timed(lambda: eng.generate(input_ids=ids_for(16), sampling_params={**g, "max_new_tokens": 129}))
        rows["decode 128 @ batch 1"] = 128 / (t128 - t1)
        with fused_decode_switch(False):  # the same without the fused decode step, for comparison
            eng.flush_cache()
            t128 = timed(lambda: eng.generate(input_ids=ids_for(16), sampling_params={**g, "max_new_tokens": 129}))
        rows["  same, layers unfused"] = 128 / (t128 - t1)
        prompts = [ids_for(64)[:60] + [100 + i] * 4 for i in range(16)]
        eng.flush_cache()
        rows["16 concurrent"] = 16 * 128 / timed(lambda: eng.generate(
            input_ids=prompts, sampling_params={**g, "max_new_tokens": 128}))
        prefix = ids_for(600)
        eng.flush_cache()
        rows["fan-out 16 x 32"] = 16 * 32 / timed(lambda: eng.generate(
            input_ids=[prefix + [200 + i] for i in range(16)], sampling_params={**g, "max_new_tokens": 32}))
        mem["after runs"] = rss_mb()
        split = {"Python layers": step_split(eng, False), "fused": step_split(eng, True)}
    finally:
        eng.shutdown()
    pool = runner.kv_pool
    mem["KV pool"] = 2 * pool.num_layers * sum(b.numel() * b.element_size() for b in pool.k_buffer[:1]) / 2**20
    info = {"mem": mem, "split": split, "quantization": runner.quantization, "kv": str(pool.dtype),
            "slots": pool.num_slots}
    return rows, info


@contextlib.contextmanager
def fused_decode_switch(on: bool) -> Iterator[None]:
    """RADIXFLOW_FUSED_DECODE set to on / off inside the block (runtime/model/fused_decode.py reads it
    at every step), restored after."""
    name, saved = "RADIXFLOW_FUSED_DECODE", os.environ.get("RADIXFLOW_FUSED_DECODE")
    os.environ[name] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def step_split(eng, fused: bool) -> dict[str, float]:
    """ms per decode step at batch 1 in matmuls (linear layers and LM head), attention, and the rest,
    with the fused decode step (runtime/model/fused_decode.py) on or off: the Python path's calls are
    timed by wrapping them, the fused step's by its own nanosecond counters."""
    from radixflow.runtime.model import fused_decode, llama

    acc = {"matmuls": 0.0, "attention": 0.0}
    runner = eng.scheduler.runner
    step = fused_decode.state(runner.model, runner.attn_backend).step if fused else None
    if step is not None:
        step.timing = True
        ns0 = (step.matmul_ns, step.attention_ns)

    def wrap(obj, name: str, key: str):
        orig = getattr(obj, name)

        def timed_call(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
        setattr(obj, name, timed_call)
        return orig

    saved = [(llama.Linear, "forward", wrap(llama.Linear, "forward", "matmuls")),
             (llama.LlamaForCausalLM, "compute_logits", wrap(llama.LlamaForCausalLM, "compute_logits", "matmuls")),
             (runner.attn_backend, "forward", wrap(runner.attn_backend, "forward", "attention"))]
    fwd = {"total": 0.0, "steps": 0}
    orig_forward = runner.forward

    def counted(batch):
        t = time.perf_counter()
        try:
            return orig_forward(batch)
        finally:
            fwd["total"] += time.perf_counter() - t
            fwd["steps"] += 1
    runner.forward = counted
    try:
        with fused_decode_switch(fused):
            eng.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0, "ignore_eos": True,
                                                               "max_new_tokens": 65})
    finally:
        for obj, name, orig in saved:
            setattr(obj, name, orig)
        del runner.forward
    if step is not None:
        step.timing = False
        acc["matmuls"] += (step.matmul_ns - ns0[0]) / 1e9
        acc["attention"] += (step.attention_ns - ns0[1]) / 1e9
    steps = max(fwd["steps"], 1)
    out = {k: 1e3 * v / steps for k, v in acc.items()}
    out["other"] = 1e3 * fwd["total"] / steps - out["matmuls"] - out["attention"]
    return out


# -- llama.cpp -----------------------------------------------------------------------------------


def llama_cpp_python_rows(args: argparse.Namespace, ids_for: Callable[[int], list[int]]) -> dict[str, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=args.gguf, n_ctx=8192 + 256, n_threads=args.threads, n_batch=512, verbose=False)
    rows = {}

    def run(tokens: list[int], n: int) -> None:
        for i, _ in enumerate(llm.generate(tokens, temp=0.0, reset=False)):
            if i + 1 >= n:
                break

    for n in (512, 8000):
        if n == 8000 and args.skip_8k:
            continue
        llm.reset()
        rows[f"prefill {n}"] = n / timed(lambda n=n: run(ids_for(n), 1))
    llm.reset()
    t1 = timed(lambda: run(ids_for(16), 1))
    llm.reset()
    rows["decode 128 @ batch 1"] = 128 / (timed(lambda: run(ids_for(16), 129)) - t1)
    prompts = [ids_for(64)[:60] + [100 + i] * 4 for i in range(16)]
    rows["16 concurrent"] = 16 * 128 / timed(lambda: [run(p, 128) for p in prompts])
    prefix = ids_for(600)
    rows["fan-out 16 x 32"] = 16 * 32 / timed(lambda: [run(prefix + [200 + i], 32) for i in range(16)])
    return rows


def llama_bench_rows(args: argparse.Namespace) -> dict[str, float]:
    prompts = "512" if args.skip_8k else "512,8000"
    out = subprocess.run([args.llama_bench, "-m", args.gguf, "-t", str(args.threads), "-p", prompts, "-n", "128",
                          "-r", "3", "-o", "json"], capture_output=True, text=True, check=True, env=PEER_ENV).stdout
    rows = {}
    for r in json.loads(out):
        key = f"prefill {r['n_prompt']}" if r.get("n_prompt") else "decode 128 @ batch 1"
        rows[key] = float(r["avg_ts"])
    return rows


def _start_healthy(cmd: list[str], url: str) -> tuple[subprocess.Popen, str]:
    """Start a peer's server (llama.cpp's environment) and poll `url`/health until it answers 200;
    (process, url). It prints no ready line as `radixflow serve` does (local_server.start)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)
    for _ in range(900):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{url} did not become healthy")


def _tree_rss_mb(pid: int) -> tuple[float, dict[int, float]]:
    """Resident MB of a process and all its descendants, and per process."""
    seen, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            seen[p] = rss_mb(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return sum(seen.values()), seen


def server_rows(launch: Callable[[], tuple[subprocess.Popen, str]], body: Callable[[list[int], int], tuple[str, dict]],
                ids_for: Callable[[int], list[int]]) -> tuple[dict, dict]:
    """Start a server (`launch()`: the process, once it serves, and its URL), then over HTTP:
    decode of 128 tokens at batch 1, 16 concurrent requests and the fan-out. Returns the rows and
    the server's resident memory (MB) after them."""
    proc, url = launch()
    try:
        def post(tokens: list[int], n: int) -> None:
            path, payload = body(tokens, n)
            urllib.request.urlopen(urllib.request.Request(f"{url}{path}", json.dumps(payload).encode(),
                                                          {"Content-Type": "application/json"}), timeout=900).read()

        def together(jobs: list[tuple[list[int], int]]) -> float:
            threads = [threading.Thread(target=post, args=j) for j in jobs]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return time.perf_counter() - t

        post(ids_for(8), 4)
        t1 = timed(lambda: post(ids_for(16)[:15] + [7], 1))
        rows = {"decode 128 @ batch 1": 128 / (timed(lambda: post(ids_for(16)[:15] + [9], 129)) - t1)}
        prompts = [ids_for(64)[:60] + [100 + i] * 4 for i in range(16)]
        rows["16 concurrent"] = 16 * 128 / together([(p, 128) for p in prompts])
        prefix = ids_for(600)
        rows["fan-out 16 x 32"] = 16 * 32 / together([(prefix + [200 + i], 32) for i in range(16)])
        total, each = _tree_rss_mb(proc.pid)
        return rows, {"all processes": total, "largest process": max(each.values())}
    finally:
        stop(proc)


def llama_server_rows(args: argparse.Namespace, ids_for: Callable[[int], list[int]]) -> tuple[dict, dict]:
    port = 18000 + os.getpid() % 1000
    cmd = [args.llama_server, "-m", args.gguf, "-t", str(args.threads), "-np", "16", "-c", str(16 * 1024),
           "--port", str(port)]

    def body(tokens: list[int], n: int) -> tuple[str, dict]:
        return "/completion", {"prompt": tokens, "n_predict": n, "temperature": 0, "cache_prompt": True,
                               "ignore_eos": True}
    return server_rows(lambda: _start_healthy(cmd, f"http://127.0.0.1:{port}"), body, ids_for)


def radixflow_server_rows(args: argparse.Namespace, ids_for: Callable[[int], list[int]]) -> tuple[dict, dict]:
    """`radixflow serve` on the same GGUF, through HTTP as llama-server is measured."""
    argv = serve_argv(["--quantization", args.quantization, "--kv-cache-dtype", args.kv_cache_dtype,
                       "--max-running-requests", "16", "--num-threads", str(args.threads)], args.gguf)

    def body(tokens: list[int], n: int) -> tuple[str, dict]:
        return "/generate", {"input_ids": tokens, "sampling_params": {"temperature": 0, "max_new_tokens": n,
                                                                      "ignore_eos": True}}
    return server_rows(lambda: start(argv, stderr=subprocess.DEVNULL), body, ids_for)


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the default model's)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quantization", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench binary")
    p.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary")
    p.add_argument("--skip-8k", action="store_true", help="leave out the 8,000-token prefill")
    args = p.parse_args()
    import torch

    from radixflow.kernels import cpu_quant
    from radixflow.runtime.loading.default_model import default_gguf_path, resolve_model_path
    from radixflow.runtime.text.tokenizer import Tokenizer

    args.gguf = args.gguf or default_gguf_path()
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_pretrained(resolve_model_path(args.gguf))
    base = tok.encode(words(6000))

    def ids_for(n: int) -> list[int]:
        return (base * (n // len(base) + 1))[:n]

    print(cpu_line())
    print(f"torch {torch.__version__}, {args.threads} threads; radixflow quantized kernels: "
          f"{cpu_quant.supported_level() if cpu_quant.available() else 'unavailable'}")
    ours, info = radixflow_rows(args, ids_for)
    served, mem = radixflow_server_rows(args, ids_for) if args.llama_server else ({}, {})
    peers: dict[str, dict[str, float]] = {}
    lcp = llama_cpp_python_rows(args, ids_for)
    if lcp is not None:
        peers["llama-cpp-python"] = lcp
    if args.llama_bench:
        peers["llama-bench"] = llama_bench_rows(args)
    if args.llama_server:
        peers["llama-server"], mem["llama-server"] = llama_server_rows(args, ids_for)
    print(f"\nradixflow: weights {info['quantization']}, KV {info['kv']} ({info['slots']} slots); gguf {args.gguf}")
    print("ratios: llama-server's rows against `radixflow serve` (both over HTTP), the others against the Engine")
    names = list(peers)
    print(f"{'workload':<24}{'Engine tok/s':>14}{'serve tok/s':>13}" + "".join(f"{n:>18}{'ratio':>8}" for n in names))
    for key, val in ours.items():
        mine = served.get(key)
        line = f"{key:<24}{val:>14.1f}" + (f"{mine:>13.1f}" if mine else f"{'-':>13}")
        for n in names:
            theirs = peers[n].get(key)
            base = mine if n == "llama-server" and mine else val
            line += f"{theirs:>18.1f}{base / theirs:>7.2f}x" if theirs else f"{'-':>18}{'':>8}"
        print(line)
    print()
    for how, split in info["split"].items():
        total = sum(split.values())
        print(f"decode step at batch 1 ({how}): {total:.2f} ms = " +
              ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in split.items()))
    print("memory (MB, the Engine's process: scheduler + tokenizer in one): " +
          ", ".join(f"{k} {v:.0f}" for k, v in info["mem"].items()))
    if mem:
        print("memory after the server runs (MB resident): radixflow serve " +
              ", ".join(f"{k} {v:.0f}" for k, v in mem.items() if k != "llama-server") +
              "; llama-server " + ", ".join(f"{k} {v:.0f}" for k, v in mem["llama-server"].items()))
    print(cpu_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
