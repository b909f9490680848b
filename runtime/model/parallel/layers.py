"""The layers that talk to the other ranks: row-parallel linears (o_proj, down_proj) that all-reduce
their partial sums, a vocabulary-parallel embedding, and the vocabulary-parallel LM head's gather.

The column-parallel layers (qkv_proj, gate_up_proj, the LM head) stay plain `Linear`s over this
rank's rows: a model built from `ShardPlan.local_config` already has their local shapes, and its
attention runs on the local heads. A model at tp_size 1 is never touched by this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixflow.kernels import cpu_quant
from radixflow.runtime.model.llama import Embedding, Linear, LlamaForCausalLM
from radixflow.runtime.model.parallel.group import TPGroup
from radixflow.runtime.model.parallel.sharding import ShardPlan


class RowParallelLinear(Linear):
    """A Linear over this rank's slice of K whose partial outputs are summed over the ranks."""

    tp: TPGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        assert self.tp is not None
        return self.tp.all_reduce(out)


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + num_embeddings) of the embedding: ids outside give zeros, and the sum
    over the ranks is the full lookup. `_qw`: the quantized rows (the weight is then None)."""

    tp: TPGroup | None = None
    start = 0
    _qw: cpu_quant.QuantWeight | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        local = local.masked_fill(outside, 0)
        rows = cpu_quant.embedding(self._qw, local) if self._qw is not None else F.embedding(local, self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        assert self.tp is not None
        return self.tp.all_reduce(rows)


def _row_parallel(old: Linear, tp: TPGroup) -> RowParallelLinear:
    if old.bias is not None:  # would be added once per rank; no supported architecture has one
        raise ValueError("row-parallel layers with a bias are not supported")
    new = RowParallelLinear(old.in_features, old.out_features, bias=False, device=old.weight.device,
                            dtype=old.weight.dtype)
    new.tp = tp
    return new


def shard_model(model: LlamaForCausalLM, plan: ShardPlan, tp: TPGroup) -> None:
    """Turn `model` (built on the meta device from plan.local_config) into this rank's shard:
    o_proj and down_proj become row-parallel, the embedding vocabulary-parallel. Call before loading."""
    for layer in model.layers:
        layer.self_attn.o_proj = _row_parallel(layer.self_attn.o_proj, tp)
        layer.mlp.down_proj = _row_parallel(layer.mlp.down_proj, tp)
    old = model.embed_tokens
    emb = VocabParallelEmbedding(old.num_embeddings, old.embedding_dim, device=old.weight.device,
                                 dtype=old.weight.dtype)
    emb.tp, emb.start = tp, plan.vocab_start
    model.embed_tokens = emb


def local_logits(model: LlamaForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits (N, local vocab) of this rank's vocabulary rows: its LM head shard, or its
    embedding shard when the two are tied."""
    qw = getattr(model.embed_tokens, "_qw", None)
    if model.lm_head is None and qw is not None:
        return cpu_quant.linear(hidden.float(), qw)
    return model.compute_logits(hidden)


def gather_logits(local: torch.Tensor, plan: ShardPlan, vocab_size: int, tp: TPGroup) -> torch.Tensor | None:
    """Rank 0: the full fp32 logits (N, vocab_size) from every rank's (N, local vocab); other
    ranks: None (they send theirs)."""
    if local.shape[1] < plan.vocab_chunk:  # the last rank's chunk may be shorter: equal sizes to gather
        local = F.pad(local, (0, plan.vocab_chunk - local.shape[1]))
    parts = tp.gather(local.contiguous())
    if parts is None:
        return None
    return torch.cat(parts, dim=1)[:, :vocab_size]
