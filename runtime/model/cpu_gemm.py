"""Dense fp32 matmuls on CPU: radixflow's packed-weight kernel, or the faster of two BLAS libraries.

`cpu_gemm="auto"` picks "packed" whenever radixflow's C kernels build (kernels/cpu_gemm.c: the
weights are packed once at load, about 1.8x OpenBLAS at decode sizes, on par at prefill sizes, at
the cost of a second copy of the weights). Without a C compiler it falls back to the choice below.

PyTorch's CPU wheels run `F.linear` on MKL, which on non-Intel x86 CPUs (the AMD EPYC machines
this project runs on) takes a slow path for the small-M shapes of decoding: 1.3-2x slower than
the OpenBLAS that numpy ships, at M = 1..64 rows (as measured on those machines).
`probe` times both on one of the model's own weights at load, interleaved with a parallel
torch op as in a real forward (two thread pools that spin-wait for work starve each other),
and picks one for the whole model; `openblas_linear` runs `x @ W.T (+ b)` on numpy's BLAS.
Only contiguous fp32 CPU weights qualify.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


def openblas_linear(x: torch.Tensor, weight_t: np.ndarray, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) fp32 @ weight_t (in, out), a numpy view of an (out, in) weight's transpose,
    (+ bias). Returns a new (..., out) tensor (its memory is numpy's)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.from_numpy(np.matmul(x2.numpy(), weight_t))
    if bias is not None:
        out += bias
    return out.view(*lead, weight_t.shape[1])


def numpy_view_t(weight: torch.Tensor) -> np.ndarray | None:
    """The (in, out) numpy view of a contiguous fp32 CPU (out, in) weight; None if it does not qualify."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    return weight.detach().numpy().T


def probe(weight: torch.Tensor, rows: tuple[int, ...] = (1, 16), reps: int = 5) -> str:
    """'openblas' if numpy's BLAS runs `weight` faster than torch's, else 'torch'.

    Each timing is a linear followed by a torch op large enough to use torch's thread pool, as
    in a model's forward, best of `reps`, summed over `rows`. Tens of milliseconds."""
    wt = numpy_view_t(weight)
    if wt is None:
        return "torch"
    totals = {"torch": 0.0, "openblas": 0.0}
    big = torch.randn(1 << 17)
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, weight.shape[1])
            fns = {"torch": lambda x=x: F.linear(x, weight), "openblas": lambda x=x: openblas_linear(x, wt)}
            for name, fn in fns.items():
                fn()
                best = float("inf")
                for _ in range(reps):
                    t = time.perf_counter()
                    for _ in range(3):
                        fn()
                        F.silu(big)
                    best = min(best, time.perf_counter() - t)
                totals[name] += best
    return "openblas" if totals["openblas"] < totals["torch"] else "torch"
