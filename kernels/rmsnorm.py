"""Llama RMSNorm, optionally fused with the residual add (like vLLM's fused_add_rms_norm).

References: `radixflow.kernels.reference.rmsnorm_ref`, `fused_add_rmsnorm_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixflow.kernels._utils import check_launch, next_pow2
from radixflow.kernels.reference import fused_add_rmsnorm_ref, rmsnorm_ref

__all__ = ["fused_add_rmsnorm", "fused_add_rmsnorm_ref", "rmsnorm", "rmsnorm_ref"]


@triton.jit
def _rmsnorm_kernel(X, Res, W, O, Res_out, eps, stride_xt, stride_rt, stride_ot, stride_rot,
                    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # One program: one row of HIDDEN elements.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(X + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Res + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(Res_out.dtype.element_ty)  # the new residual, rounded like an eager add
        tl.store(Res_out + t * stride_rot + offs, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    normed = (x * rstd).to(O.dtype.element_ty).to(tl.float32)  # HF: cast, then scale by weight
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + t * stride_ot + offs, (normed * w).to(O.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    T, H = x.shape  # (tokens, hidden)
    assert weight.shape == (H,) and weight.stride(0) == 1, weight.shape
    assert x.stride(1) == 1, x.stride()
    assert H <= 65536, f"hidden size {H} too large for a one-block row"
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    res_out = None
    if residual is not None:
        assert residual.shape == (T, H) and residual.stride(1) == 1 and residual.dtype == x.dtype
        res_out = torch.empty_like(out)
    check_launch(_rmsnorm_kernel, *[t for t in (x, residual, weight, out, res_out) if t is not None])
    if T:
        block = next_pow2(H)
        _rmsnorm_kernel[(T,)](
            x, residual if residual is not None else x, weight, out,
            res_out if res_out is not None else out, eps, x.stride(0),
            residual.stride(0) if residual is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HIDDEN=H, BLOCK=block, HAS_RESIDUAL=residual is not None,
            **({"num_warps": min(max(block // 256, 1), 16)} if x.is_cuda else {}))
    return out, res_out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (T, H), weight (H,) -> weight * (x / sqrt(mean(x^2) + eps)) (T, H) in x's dtype.

    Like Hugging Face Llama: normalized in float32 and rounded to x's dtype, then multiplied
    by weight and rounded again. x needs unit stride on H. Returns a new tensor.
    """
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual (rounded to x's dtype) -> (rmsnorm(r, weight, eps), r); both new tensors.

    x, residual (T, H) of one dtype; the decoder layer feeds r on as the next residual.
    """
    out, res_out = _launch(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out
