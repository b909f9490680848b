"""Attention backend on radixflow's Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixflow.kernels.decode_attention import decode_attention, default_num_kv_splits
from radixflow.kernels.extend_attention import extend_attention
from radixflow.kernels.store_kv import store_kv
from radixflow.runtime.model.attention.base import AttentionBackend
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode


@dataclass
class TritonAttnMetadata:
    """Per-batch launch parameters, shared by every layer of one forward.

    max_extend_len: grid size of the extend kernel (host int, so no device sync per layer).
    num_kv_splits: flash-decoding chunks per request.
    decode_workspace: (mid_o, mid_lse) per (q heads, head_dim), allocated by the first layer.
    """

    max_extend_len: int
    num_kv_splits: int
    decode_workspace: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class TritonAttnBackend(AttentionBackend):
    """Writes K/V with `store_kv`, then runs `extend_attention` or `decode_attention`.

    EXTEND batches (including decode-like requests with extend_len 1) use the extend kernel;
    DECODE batches use flash-decoding. `init_forward_metadata(batch)` must run before the layers.
    """

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        batch.attn_metadata = TritonAttnMetadata(
            max_extend_len=max(batch.extend_lens_cpu, default=0),
            num_kv_splits=default_num_kv_splits(batch.batch_size, self.kv_pool.kv_heads,
                                                batch.seq_lens.device),
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        store_kv(k, v, self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id],
                 batch.out_cache_loc)
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, layer_id, batch, scale)
        return self.forward_extend(q, layer_id, batch, scale)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
        meta = self._metadata(batch)
        T, Hq, D = q.shape  # (tokens, q heads, head_dim)
        out = extend_attention(
            q, self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id],
            self.req_to_token_pool.req_to_token, batch.req_pool_indices, batch.prefix_lens,
            batch.extend_lens, batch.extend_start_loc, scale, max_extend_len=meta.max_extend_len)
        return out.view(T, Hq * D)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor:
        meta = self._metadata(batch)
        B, Hq, D = q.shape  # (batch, q heads, head_dim): one new token per request
        assert B == batch.batch_size, (B, batch.batch_size)
        workspace = meta.decode_workspace.get((Hq, D))
        if workspace is None:
            S = meta.num_kv_splits
            workspace = (torch.empty((B, Hq, S, D), dtype=torch.float32, device=q.device),
                         torch.empty((B, Hq, S), dtype=torch.float32, device=q.device))
            meta.decode_workspace[(Hq, D)] = workspace
        out = decode_attention(
            q, self.kv_pool.k_buffer[layer_id], self.kv_pool.v_buffer[layer_id],
            self.req_to_token_pool.req_to_token, batch.req_pool_indices, batch.seq_lens, scale,
            num_kv_splits=meta.num_kv_splits, workspace=workspace)
        return out.view(B, Hq * D)

    @staticmethod
    def _metadata(batch: ForwardBatch) -> TritonAttnMetadata:
        meta = batch.attn_metadata
        assert isinstance(meta, TritonAttnMetadata), \
            "call TritonAttnBackend.init_forward_metadata(batch) before the forward"
        return meta
