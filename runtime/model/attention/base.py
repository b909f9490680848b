"""The seam between the model and attention kernels."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.memory_pool import KVPool, ReqToTokenPool


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the pool, then attends over prefix + new tokens.

    Contract for `forward`:
      q: (T, num_heads, head_dim), k/v: (T, kv_heads, head_dim) for the T new tokens of
      `batch` (in batch order). Request i's keys are its `prefix_lens[i]` cached tokens,
      read through `req_to_token[req_pool_indices[i], :prefix_len]`, followed by its new
      tokens; new token j attends causally (to prefix and new tokens 0..j).
      Returns (T, num_heads * head_dim) in q's dtype.
    The caller has already written `req_to_token[row, prefix:seq_len] = out_cache_loc` for
    every request before the forward.
    """

    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool) -> None:
        self.kv_pool = kv_pool
        self.req_to_token_pool = req_to_token_pool

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Precompute per-batch indices once, before the layers run."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch, scale: float) -> torch.Tensor:
        self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, layer_id, batch, scale)
        return self.forward_extend(q, layer_id, batch, scale)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch,
                       scale: float) -> torch.Tensor: ...
