"""Decode attention (one query per request) over the paged KV pool, flash-decoding style.

Stage 1 splits each request's keys into `num_kv_splits` chunks; one program per (request,
kv head, chunk) serves all the query heads of that kv head (GQA), so each K/V row is read
once, and writes a normalized partial output and its log-sum-exp. Stage 2 merges the chunks.
Reference: `radixflow.kernels.reference.decode_attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixflow.kernels._utils import check_launch, next_pow2
from radixflow.kernels.reference import decode_attention_ref

__all__ = ["decode_attention", "decode_attention_ref", "default_num_kv_splits"]

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_stage1_kernel(
    Q, K_Buf, V_Buf, Req_to_token, Req_pool_indices, Seq_lens, Mid_o, Mid_lse,
    sm_scale_log2,
    stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_rt,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(Seq_lens + b).to(tl.int32)
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if end <= start:
        return  # empty chunk: stage 2 skips it by the same arithmetic
    row = tl.load(Req_pool_indices + b).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_H)  # query heads of this kv head
    heads = kvh * GROUP + offs_g
    mask_h = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(Req_to_token + row * stride_rt + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K_Buf + slots[:, None] * stride_kbs + kvh * stride_kbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V_Buf + slots[:, None] * stride_vbs + kvh * stride_vbh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * sm_scale_log2  # (BLOCK_H, BLOCK_N)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o_ptrs = Mid_o + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(o_ptrs, acc / l_i[:, None], mask=mask_h[:, None] & mask_d[None, :])
    tl.store(Mid_lse + b * stride_mlb + heads * stride_mlh + split, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _decode_stage2_kernel(
    Mid_o, Mid_lse, O, Seq_lens,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(Seq_lens + b).to(tl.int32)
    split_len = tl.cdiv(seq_len, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    m_run = -1e30
    l_run = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        if end > start:
            o_s = tl.load(Mid_o + b * stride_mob + h * stride_moh + split * stride_mos + offs_d,
                          mask=mask_d, other=0.0)
            lse_s = tl.load(Mid_lse + b * stride_mlb + h * stride_mlh + split)
            m_new = tl.maximum(m_run, lse_s)
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(lse_s - m_new)
            acc = acc * alpha + w * o_s
            l_run = l_run * alpha + w
            m_run = m_new
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, (acc / l_run).to(O.dtype.element_ty), mask=mask_d)


def default_num_kv_splits(batch_size: int, kv_heads: int, device: torch.device) -> int:
    """Chunks per request: enough programs to fill the GPU's SMs about twice, at most 16."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, triton.cdiv(2 * sms, max(1, batch_size * kv_heads))))


def _check_inputs(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                  req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> int:
    """Assert decode_attention's shape, stride and dtype contract; returns the kv head count."""
    B, Hq, D = q.shape  # (batch, q heads, head_dim)
    num_slots_1, Hkv, _ = k_buffer.shape  # (num_slots + 1, kv heads, head_dim)
    assert k_buffer.shape == v_buffer.shape == (num_slots_1, Hkv, D), (k_buffer.shape, v_buffer.shape)
    assert Hq % Hkv == 0, f"q heads {Hq} not a multiple of kv heads {Hkv}"
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1
    assert k_buffer.dtype == v_buffer.dtype
    assert req_to_token.dim() == 2 and req_to_token.dtype == torch.int32 and req_to_token.stride(1) == 1
    assert req_pool_indices.shape == seq_lens.shape == (B,)
    assert not req_pool_indices.is_floating_point() and not seq_lens.is_floating_point()
    return Hkv


def _split_workspace(q: torch.Tensor, S: int, workspace: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid_o float32 (B, Hq, S, D), mid_lse float32 (B, Hq, S)): the first B rows of
    `workspace`, or new tensors when it is None."""
    B, Hq, D = q.shape
    if workspace is None:
        mid_o = torch.empty((B, Hq, S, D), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    else:
        mid_o, mid_lse = workspace
        mid_o, mid_lse = mid_o[:B], mid_lse[:B]
    assert mid_o.shape == (B, Hq, S, D) and mid_o.dtype == torch.float32 and mid_o.stride(3) == 1
    assert mid_lse.shape == (B, Hq, S) and mid_lse.dtype == torch.float32 and mid_lse.stride(2) == 1
    return mid_o, mid_lse


def decode_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_kv_splits: int | None = None,
                     out: torch.Tensor | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of one query per request over all its keys.

    q (B, Hq, D), any batch/head strides, unit stride on D; k_buffer/v_buffer (num_slots + 1,
    Hkv, D), Hq a multiple of Hkv; req_to_token int32 (rows, max_ctx); req_pool_indices,
    seq_lens (B,) integer tensors on q's device, every seq_len >= 1. Request i's keys are pool
    rows req_to_token[req_pool_indices[i], :seq_lens[i]]; query head h reads kv head
    h // (Hq // Hkv). Returns `out` (B, Hq, D) in q's dtype = softmax(q . k * scale) @ v.
    Launches no host sync. `workspace` = (mid_o float32 (B, Hq, S, D), mid_lse float32
    (B, Hq, S)) with S = num_kv_splits, allocated when None (pass it to reuse memory, e.g.
    under CUDA graphs). Matches `decode_attention_ref` up to float32 reordering.
    """
    B, Hq, D = q.shape  # (batch, q heads, head_dim)
    Hkv = _check_inputs(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(B, Hkv, q.device)
    S = num_kv_splits
    assert S >= 1
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    assert out.shape == (B, Hq, D) and out.stride(2) == 1
    mid_o, mid_lse = _split_workspace(q, S, workspace)
    interpreted = check_launch(_decode_stage1_kernel, q, k_buffer, v_buffer, req_to_token,
                          req_pool_indices, seq_lens, out, mid_o, mid_lse)
    if B == 0:
        return out
    group = Hq // Hkv
    block_d = next_pow2(D, 16)
    _decode_stage1_kernel[(B, Hkv, S)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0),
        v_buffer.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=next_pow2(group, 16),
        BLOCK_N=16 if interpreted else 64, NUM_SPLITS=S, UPCAST=interpreted,
        **({} if interpreted else {"num_warps": 4, "num_stages": 2}),
    )
    _decode_stage2_kernel[(B, Hq)](
        mid_o, mid_lse, out, seq_lens,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=S,
        **({} if interpreted else {"num_warps": 4}),
    )
    return out
