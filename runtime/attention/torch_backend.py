"""Portable attention on PyTorch SDPA, reading K/V from the token-level pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixflow.runtime.attention.base import AttentionBackend
from radixflow.runtime.forward_batch import ForwardBatch, ForwardMode


@dataclass
class _ExtendMeta:
    kv_indices: list[torch.Tensor]  # per request: int64 (seq_len,) pool slots
    masks: list[torch.Tensor | None]  # per request: bool (extend, seq_len) or None for plain causal


@dataclass
class _DecodeMeta:
    kv_indices: torch.Tensor  # int64 (B, max_len)
    mask: torch.Tensor | None  # bool (B, 1, 1, max_len), None when all lengths are equal


class TorchAttnBackend(AttentionBackend):
    """Per-request SDPA for extend (causal over new tokens, full over the prefix); one padded,
    masked SDPA call for the whole decode batch."""

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        r2t = self.req_to_token_pool.req_to_token
        rows = batch.req_pool_indices
        if batch.mode is ForwardMode.DECODE:
            max_len = max(batch.seq_lens_cpu)
            idx = r2t[rows, :max_len].to(torch.int64)
            mask = None
            if min(batch.seq_lens_cpu) != max_len:
                ar = torch.arange(max_len, device=idx.device)
                mask = (ar[None, :] < batch.seq_lens[:, None]).view(len(batch.seq_lens_cpu), 1, 1, max_len)
            batch.attn_metadata = _DecodeMeta(idx, mask)
            return
        kv_indices, masks = [], []
        for i, (p, e) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
            kv_indices.append(r2t[rows[i], :p + e].to(torch.int64))
            if p == 0:
                masks.append(None)
            else:
                q_pos = torch.arange(p, p + e, device=r2t.device)
                k_pos = torch.arange(p + e, device=r2t.device)
                masks.append(k_pos[None, :] <= q_pos[:, None])
        batch.attn_metadata = _ExtendMeta(kv_indices, masks)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
        meta: _ExtendMeta = batch.attn_metadata
        T, H, D = q.shape
        kb, vb = self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id]
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        start = 0
        for i, e in enumerate(batch.extend_lens_cpu):
            qi = q[start:start + e].transpose(0, 1)  # (H, e, D)
            idx = meta.kv_indices[i]
            ki = kb[idx].transpose(0, 1).to(q.dtype)  # (Hkv, L, D)
            vi = vb[idx].transpose(0, 1).to(q.dtype)
            mask = meta.masks[i]
            oi = F.scaled_dot_product_attention(
                qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=ki.shape[0] != H)
            out[start:start + e] = oi[0].transpose(0, 1)
            start += e
        return out.view(T, H * D)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
        meta: _DecodeMeta = batch.attn_metadata
        B, H, D = q.shape
        kb, vb = self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id]
        k = kb[meta.kv_indices].permute(0, 2, 1, 3).to(q.dtype)  # (B, Hkv, L, D)
        v = vb[meta.kv_indices].permute(0, 2, 1, 3).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=meta.mask, scale=scale, enable_gqa=k.shape[1] != H)
        return o.view(B, H * D)
