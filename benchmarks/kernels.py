"""Time radixflow's Triton kernels against PyTorch baselines on a GPU and print a table.

    python benchmarks/kernels.py                 # CUDA: real sizes
    python benchmarks/kernels.py --interpret     # CPU smoke run under the Triton interpreter

Baselines: decode / extend attention vs torch SDPA on K/V already gathered into dense
per-request tensors (the gather is not timed: SDPA gets the easier problem); the elementwise
kernels vs their eager PyTorch references. Decode attention also reports achieved memory
bandwidth (bytes of K/V read / time) as a fraction of the GPU's peak.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable

import torch

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def peak_bandwidth(name: str) -> float | None:
    for key, peak in PEAK_BYTES_PER_S.items():  # most specific names first
        if key in name:
            return peak
    return None


def bench(cuda: bool, fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Median milliseconds per call of fn(*args, **kwargs)."""
    call = functools.partial(fn, *args, **kwargs)
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    call()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def make_kv(seq_lens: list[int], hkv: int, d: int, dtype: torch.dtype, device: str):
    """A shuffled KV pool holding every request's tokens, and its req_to_token rows."""
    total = sum(seq_lens)
    k_buf = torch.randn(total + 1, hkv, d, dtype=dtype, device=device)
    v_buf = torch.randn(total + 1, hkv, d, dtype=dtype, device=device)
    slots = (torch.randperm(total) + 1).to(device=device, dtype=torch.int32)
    r2t = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32, device=device)
    off = 0
    for i, n in enumerate(seq_lens):
        r2t[i, :n] = slots[off:off + n]
        off += n
    rows = torch.arange(len(seq_lens), device=device)
    return k_buf, v_buf, r2t, rows


def dense(buf: torch.Tensor, r2t: torch.Tensor, i: int, n: int, group: int) -> torch.Tensor:
    """(1, Hq, n, D) keys of request i, kv heads repeated for SDPA."""
    return buf[r2t[i, :n].long()].repeat_interleave(group, 1).transpose(0, 1)[None]


def bench_decode(rows: list[list[str]], cuda: bool, device: str, dtype: torch.dtype, tiny: bool) -> None:
    from radixflow.kernels.decode_attention import decode_attention

    F = torch.nn.functional
    cases = [(2, 6, 2, 32, 40)] if tiny else [
        (b, hq, hkv, d, s) for (hq, hkv, d) in [(9, 3, 64), (32, 8, 128)]
        for b, s in [(1, 4096), (16, 2048), (64, 2048), (256, 1024), (32, 16384)]]
    peak = peak_bandwidth(torch.cuda.get_device_name()) if cuda else None
    for b, hq, hkv, d, s in cases:
        seq = [s] * b
        k_buf, v_buf, r2t, idx = make_kv(seq, hkv, d, dtype, device)
        q = torch.randn(b, hq, d, dtype=dtype, device=device)
        seq_t = torch.tensor(seq, device=device)
        ms = bench(cuda, decode_attention, q, k_buf, v_buf, r2t, idx, seq_t, d ** -0.5)
        kd = torch.cat([dense(k_buf, r2t, i, s, hq // hkv) for i in range(b)])  # (B, Hq, S, D)
        vd = torch.cat([dense(v_buf, r2t, i, s, hq // hkv) for i in range(b)])
        base = bench(cuda, F.scaled_dot_product_attention, q[:, :, None], kd, vd, scale=d ** -0.5)
        kv_bytes = 2 * sum(seq) * hkv * d * k_buf.element_size()
        bw = kv_bytes / (ms * 1e-3)
        note = f"{bw / 1e9:.0f} GB/s" + (f" = {bw / peak:.0%} of peak" if peak else "")
        rows.append([f"decode_attention B={b} S={s} H={hq}/{hkv} D={d}", f"{ms:.3f}", "SDPA dense",
                     f"{base:.3f}", f"{base / ms:.2f}x", note])


def sdpa_per_request(per_req: list[tuple[torch.Tensor, ...]], scale: float) -> None:
    for q, k, v, mask in per_req:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def bench_extend(rows: list[list[str]], cuda: bool, device: str, dtype: torch.dtype, tiny: bool) -> None:
    from radixflow.kernels.extend_attention import extend_attention

    cases = [("tiny", [(3, 20), (0, 9)], 6, 2, 32)] if tiny else [
        (name, comp, hq, hkv, d) for (hq, hkv, d) in [(9, 3, 64), (32, 8, 128)] for name, comp in [
            ("prefill 4x2048", [(0, 2048)] * 4),
            ("prefix 4x(3072+1024)", [(3072, 1024)] * 4),
            ("chunk 1x(8192+1024)", [(8192, 1024)]),
        ]]
    for name, comp, hq, hkv, d in cases:
        seq = [p + e for p, e in comp]
        k_buf, v_buf, r2t, idx = make_kv(seq, hkv, d, dtype, device)
        ext = torch.tensor([e for _, e in comp], device=device)
        prefix = torch.tensor([p for p, _ in comp], device=device)
        start = torch.cumsum(ext, 0) - ext
        q = torch.randn(int(ext.sum()), hq, d, dtype=dtype, device=device)
        max_ext = max(e for _, e in comp)
        ms = bench(cuda, extend_attention, q, k_buf, v_buf, r2t, idx, prefix, ext, start, d ** -0.5,
                   max_extend_len=max_ext)
        group = hq // hkv
        per_req = []
        off = 0
        for i, (p, e) in enumerate(comp):
            mask = torch.ones(e, p + e, dtype=torch.bool, device=device).tril(p)
            per_req.append((q[off:off + e].transpose(0, 1)[None], dense(k_buf, r2t, i, p + e, group),
                            dense(v_buf, r2t, i, p + e, group), mask))
            off += e
        base = bench(cuda, sdpa_per_request, per_req, d ** -0.5)
        flops = sum(4 * e * (p + e / 2) * hq * d for p, e in comp)  # causal: QK^T and PV
        rows.append([f"extend_attention {name} H={hq}/{hkv} D={d}", f"{ms:.3f}", "SDPA per request",
                     f"{base:.3f}", f"{base / ms:.2f}x", f"{flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s"])


def bench_elementwise(rows: list[list[str]], cuda: bool, device: str, dtype: torch.dtype,
                      tiny: bool) -> None:
    from radixflow.kernels import reference as ref
    from radixflow.kernels.activation import silu_and_mul
    from radixflow.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
    from radixflow.kernels.rotary import build_rope_cache, rotary
    from radixflow.kernels.store_kv import store_kv

    T, H, I, hq, hkv, d = (8, 64, 96, 3, 1, 32) if tiny else (4096, 4096, 14336, 32, 8, 128)
    x = torch.randn(T, H, dtype=dtype, device=device)
    res = torch.randn(T, H, dtype=dtype, device=device)
    w = torch.randn(H, dtype=dtype, device=device)
    gu = torch.randn(T, 2 * I, dtype=dtype, device=device)
    q = torch.randn(T, hq, d, dtype=dtype, device=device)
    k = torch.randn(T, hkv, d, dtype=dtype, device=device)
    pos = torch.randint(0, 8192, (T,), device=device)
    cos, sin = build_rope_cache(d, 8192, 500000.0, device=device)
    k_buf = torch.zeros(2 * T + 1, hkv, d, dtype=dtype, device=device)
    v_buf = torch.zeros_like(k_buf)
    loc = (torch.randperm(2 * T)[:T] + 1).to(device)
    # (name, kernel, its reference, arguments, elements read + written)
    cases: list[tuple[str, Callable[..., object], Callable[..., object], tuple, int]] = [
        (f"rmsnorm T={T} H={H}", rmsnorm, ref.rmsnorm_ref, (x, w, 1e-6), 2 * x.numel()),
        (f"fused_add_rmsnorm T={T} H={H}", fused_add_rmsnorm, ref.fused_add_rmsnorm_ref,
         (x, res, w, 1e-6), 4 * x.numel()),
        (f"silu_and_mul T={T} I={I}", silu_and_mul, ref.silu_and_mul_ref, (gu,), 3 * gu.numel() // 2),
        (f"rotary T={T} H={hq}/{hkv} D={d}", rotary, ref.rotary_ref, (q, k, pos, cos, sin),
         2 * (q.numel() + k.numel())),
        (f"store_kv T={T} H={hkv} D={d}", store_kv, ref.store_kv_ref, (k, k, k_buf, v_buf, loc),
         4 * k.numel()),
    ]
    for name, fn, base_fn, fn_args, elems in cases:
        ms, base = bench(cuda, fn, *fn_args), bench(cuda, base_fn, *fn_args)
        gbs = elems * x.element_size() / (ms * 1e-3) / 1e9
        rows.append([name, f"{ms:.3f}", "eager torch", f"{base:.3f}", f"{base / ms:.2f}x", f"{gbs:.0f} GB/s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true", help="CPU smoke run under the Triton interpreter")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.interpret:
        print("benchmarks/kernels.py needs a CUDA GPU (use --interpret for a CPU smoke run); skipping.")
        return 0
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
        cuda = False
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    torch.manual_seed(0)
    rows: list[list[str]] = []
    for fn in (bench_decode, bench_extend, bench_elementwise):
        fn(rows, cuda, device, dtype, tiny=not cuda)
    head = ["kernel", "triton ms", "baseline", "baseline ms", "speedup", "throughput"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (Triton interpreter)'}, dtype {dtype}")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
