"""Llama rotary position embedding (rotate-half layout) on q and k, in place or not.

Reference: `radixflow.kernels.reference.rotary_ref`; tables from `rope_cache.build_rope_cache`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixflow.kernels._utils import check_launch, next_pow2
from radixflow.kernels.reference import rotary_ref
from radixflow.kernels.rope_cache import build_rope_cache

__all__ = ["build_rope_cache", "rotary", "rotary_ref"]


@triton.jit
def _rotate(X, O, t, c, s, stride_xt, stride_xh, stride_ot, stride_oh, heads,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HALF)
    x_ptrs = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = O + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, (x1 * c - x2 * s).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, (x2 * c + x1 * s).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, Q_out, K_out, Pos, Cos, Sin, q_heads, k_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh,
                   stride_kot, stride_koh, stride_cos, stride_sin,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HK: tl.constexpr):
    # One program: all q and k heads of one token.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    c = tl.load(Cos + pos * stride_cos + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_sin + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate(Q, Q_out, t, c, s, stride_qt, stride_qh, stride_qot, stride_qoh, q_heads,
            HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate(K, K_out, t, c, s, stride_kt, stride_kh, stride_kot, stride_koh, k_heads,
            HALF, BLOCK_HK, BLOCK_HALF)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama rope: with c = cos[positions], s = sin[positions], x1 = x[..., :D/2], x2 = x[..., D/2:],
    x <- cat(x1 * c - x2 * s, x2 * c + x1 * s) for x in (q, k), in float32, rounded to x's dtype.

    q (T, Hq, D), k (T, Hkv, D): any token/head strides, unit stride on D (views of a fused
    qkv projection are fine). positions (T,) integer; cos, sin (max_positions, D/2) from
    `build_rope_cache`. inplace=True overwrites q and k and returns them; otherwise returns
    new contiguous tensors and leaves q, k untouched.
    """
    T, Hq, D = q.shape  # (tokens, q heads, head_dim)
    _, Hkv, _ = k.shape  # (tokens, kv heads, head_dim)
    assert k.shape == (T, Hkv, D) and D % 2 == 0, (q.shape, k.shape)
    assert q.stride(2) == 1 and k.stride(2) == 1
    assert positions.shape == (T,) and not positions.is_floating_point()
    half = D // 2
    assert cos.shape == sin.shape and cos.shape[1] == half, (cos.shape, sin.shape, D)
    assert cos.stride(1) == 1 and sin.stride(1) == 1
    q_out = q if inplace else torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty((T, Hkv, D), dtype=k.dtype, device=k.device)
    check_launch(_rotary_kernel, q, k, q_out, k_out, positions, cos, sin)
    if T:
        _rotary_kernel[(T,)](
            q, k, q_out, k_out, positions, cos, sin, Hq, Hkv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
            k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0),
            HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_HQ=next_pow2(Hq), BLOCK_HK=next_pow2(Hkv))
    return q_out, k_out
