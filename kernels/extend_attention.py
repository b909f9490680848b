"""Extend (prefill) attention over the paged KV pool, for many ragged requests at once.

Reference: `radixflow.kernels.reference.extend_attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixflow.kernels._utils import check_launch, next_pow2
from radixflow.kernels.reference import extend_attention_ref

__all__ = ["extend_attention", "extend_attention_ref"]

_LOG2E = 1.4426950408889634


@triton.jit
def _extend_attention_kernel(
    Q, K_Buf, V_Buf, O, Req_to_token, Req_pool_indices, Prefix_lens, Extend_lens, Extend_start,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_ot, stride_oh,
    stride_rt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    # One program: request b, query head h, BLOCK_M new tokens of that request.
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    ext_len = tl.load(Extend_lens + b).to(tl.int32)
    if m_block * BLOCK_M >= ext_len:
        return
    prefix = tl.load(Prefix_lens + b).to(tl.int32)
    q_start = tl.load(Extend_start + b).to(tl.int64)
    row = tl.load(Req_pool_indices + b).to(tl.int64)
    kvh = h // GROUP
    seq_len = prefix + ext_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the new tokens
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext_len
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys this block needs: all of the prefix and new tokens up to its last query.
    kv_end = prefix + tl.minimum((m_block + 1) * BLOCK_M, ext_len)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slots = tl.load(Req_to_token + row * stride_rt + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K_Buf + slots[:, None] * stride_kbs + kvh * stride_kbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V_Buf + slots[:, None] * stride_vbs + kvh * stride_vbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k = k.to(q.dtype)  # no-op unless the pool dtype differs (or UPCAST)
        v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * sm_scale_log2  # (BLOCK_M, BLOCK_N)
        causal = (offs_n[None, :] <= prefix + offs_m[:, None]) & (offs_n[None, :] < seq_len)
        qk = tl.where(causal, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = O + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     extend_start_loc: torch.Tensor, scale: float,
                     max_extend_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached prefix and themselves.

    q (T, Hq, D), any token/head strides, unit stride on D. k_buffer/v_buffer (num_slots + 1,
    Hkv, D), Hq a multiple of Hkv. req_to_token int32 (rows, max_ctx). req_pool_indices,
    prefix_lens, extend_lens, extend_start_loc: (B,) integer tensors on q's device.
    The new tokens' K/V are already in the pool and req_to_token[row_i, :prefix_i + extend_i]
    holds all their slots. New token j of request i (row extend_start_loc[i] + j of q) attends
    to keys 0 .. prefix_i + j with softmax(q . k * scale); query head h reads kv head
    h // (Hq // Hkv). Returns `out` (T, Hq, D) in q's dtype (allocated when None); rows of
    q not covered by any request are left untouched. `max_extend_len` (>= max extend_lens)
    sizes the grid; when None it is read from extend_lens (a device sync).
    Same result as `extend_attention_ref` up to float32 reordering (bf16/fp16 on CUDA: the
    dots take 16-bit inputs with float32 accumulation).
    """
    T, Hq, D = q.shape  # (tokens, q heads, head_dim)
    num_slots_1, Hkv, _ = k_buffer.shape  # (num_slots + 1, kv heads, head_dim)
    assert k_buffer.shape == v_buffer.shape == (num_slots_1, Hkv, D), (k_buffer.shape, v_buffer.shape)
    assert Hq % Hkv == 0, f"q heads {Hq} not a multiple of kv heads {Hkv}"
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert k_buffer.dtype == v_buffer.dtype
    assert req_to_token.dim() == 2 and req_to_token.dtype == torch.int32 and req_to_token.stride(1) == 1
    B = req_pool_indices.shape[0]  # (batch,)
    for t in (prefix_lens, extend_lens, extend_start_loc):
        assert t.shape == (B,) and not t.is_floating_point(), t.shape
    if out is None:
        out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    assert out.shape == (T, Hq, D) and out.stride(2) == 1
    interpreted = check_launch(_extend_attention_kernel, q, k_buffer, v_buffer, req_to_token,
                          req_pool_indices, prefix_lens, extend_lens, extend_start_loc, out)
    if B == 0 or T == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int(extend_lens.max())
    if interpreted:
        block_m = block_n = 16  # interpreter: tiny shapes, several blocks per request
    elif D <= 128:
        block_m, block_n = 64, 64
    else:
        block_m, block_n = 32, 32
    grid = (B, Hq, triton.cdiv(max(max_extend_len, 1), block_m))
    _extend_attention_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start_loc, scale * _LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0),
        v_buffer.stride(1), out.stride(0), out.stride(1), req_to_token.stride(0),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=next_pow2(D, 16), BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST=interpreted,
        **({} if interpreted else {"num_warps": 4, "num_stages": 2}),
    )
    return out
