"""SwiGLU activation: silu(gate) * up over a fused gate/up projection.

Reference: `radixflow.kernels.reference.silu_and_mul_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixflow.kernels._utils import check_launch, next_pow2
from radixflow.kernels.reference import silu_and_mul_ref

__all__ = ["silu_and_mul", "silu_and_mul_ref"]


@triton.jit
def _silu_and_mul_kernel(X, O, stride_xt, stride_ot, INTER: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(X + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_xt + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(O + t * stride_ot + offs, out.to(O.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, 2I) -> out (T, I) = silu(x[:, :I]) * x[:, I:], in float32, rounded once to x's dtype.

    x needs unit stride on its last dim (any row stride). Returns `out` (allocated when None).
    """
    T, two_i = x.shape  # (tokens, 2 * intermediate)
    assert two_i % 2 == 0 and x.stride(1) == 1, (x.shape, x.stride())
    inter = two_i // 2
    if out is None:
        out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    assert out.shape == (T, inter) and out.stride(1) == 1 and out.dtype == x.dtype
    check_launch(_silu_and_mul_kernel, x, out)
    if T == 0:
        return out
    block = min(next_pow2(inter), 1024)
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block)
    return out
