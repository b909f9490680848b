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
    masked SDPA call for the whole decode batch.

    K/V are gathered from the pool into persistent workspaces (fresh allocations of tens of MB
    per layer cost more in page faults than the copy itself), and decode attends with the
    query heads grouped per KV head, so GQA never materializes repeated K/V."""

    def __init__(self, kv_pool, req_to_token_pool) -> None:
        super().__init__(kv_pool, req_to_token_pool)
        self._k_ws = self._v_ws = None

    def _gather(self, layer_id: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows of the slots `idx` (n,), as views of the workspaces: (n, Hkv, D)."""
        n = idx.numel()
        kb, vb = self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id]
        if self._k_ws is None or self._k_ws.shape[0] < n:
            cap = max(n, 2 * (0 if self._k_ws is None else self._k_ws.shape[0]), 4096)
            self._k_ws = torch.empty((cap, *kb.shape[1:]), dtype=kb.dtype, device=kb.device)
            self._v_ws = torch.empty_like(self._k_ws)
        k, v = self._k_ws[:n], self._v_ws[:n]
        torch.index_select(kb, 0, idx, out=k)
        torch.index_select(vb, 0, idx, out=v)
        return k, v

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
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        start = 0
        for i, e in enumerate(batch.extend_lens_cpu):
            qi = q[start:start + e].transpose(0, 1)  # (H, e, D)
            k, v = self._gather(layer_id, meta.kv_indices[i])
            ki = k.transpose(0, 1).to(q.dtype)  # (Hkv, L, D)
            vi = v.transpose(0, 1).to(q.dtype)
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
        Hkv = self.kv_pool.kv_heads
        L = meta.kv_indices.shape[1]
        k, v = self._gather(layer_id, meta.kv_indices.view(-1))
        k = k.view(B, L, Hkv, D).transpose(1, 2).to(q.dtype)  # (B, Hkv, L, D)
        v = v.view(B, L, Hkv, D).transpose(1, 2).to(q.dtype)
        qg = q.view(B, Hkv, H // Hkv, D)  # q head h reads kv head h // (H // Hkv)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.mask, scale=scale)
        return o.reshape(B, H * D)
