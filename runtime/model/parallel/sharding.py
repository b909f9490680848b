"""Which part of a Llama model each tensor-parallel rank holds, and the checkpoint tensors cut to it.

Attention is split by whole GQA groups: each rank takes a contiguous range of KV heads (as even as
possible) and the query heads that read them. With more ranks than KV heads, a KV head is
replicated on several ranks and each of them takes a share of its group's query heads. The MLP's
intermediate dimension is split in units of 32 (the quantized block size, so that a row-parallel
down_proj can be cut at block boundaries), the vocabulary into equal chunks (the last may be shorter).
Column-parallel weights (q/k/v, gate/up, embedding, LM head) are cut along their rows, row-parallel
ones (o_proj, down_proj) along K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from radixflow.kernels.cpu_quant import QK, QuantBlocks, scale_group
from radixflow.runtime.model.model_config import ModelConfig

Weight = torch.Tensor | QuantBlocks


def split_range(n: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of part `index` when n items (whole units of `unit`) are cut into `parts`
    contiguous ranges as even as possible, the first ranges taking the remainder."""
    units = n // unit
    base, extra = divmod(units, parts)
    start = index * base + min(index, extra)
    end = start + base + (1 if index < extra else 0)
    return start * unit, (end * unit if end < units or n % unit == 0 else n)


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `tp_size` holds query heads [q_start, q_end), KV heads [kv_start, kv_end),
    intermediate columns [inter_start, inter_end) and vocabulary rows [vocab_start, vocab_end);
    `vocab_chunk` is the largest rank's vocabulary share (logits are gathered padded to it)."""

    tp_size: int
    rank: int
    head_dim: int
    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    inter_start: int
    inter_end: int
    vocab_start: int
    vocab_end: int
    vocab_chunk: int

    def local_config(self, mc: ModelConfig) -> ModelConfig:
        """The model config of this rank's shard: its own head counts, intermediate and vocabulary sizes."""
        return dataclasses.replace(mc, num_heads=self.q_end - self.q_start, num_kv_heads=self.kv_end - self.kv_start,
                                   intermediate_size=self.inter_end - self.inter_start,
                                   vocab_size=self.vocab_end - self.vocab_start)


def _head_ranges(heads: int, kv_heads: int, tp: int, rank: int) -> tuple[int, int, int, int]:
    """(q_start, q_end, kv_start, kv_end) of `rank` (tp <= heads); ValueError for heads that do not
    form whole GQA groups."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    if tp <= kv_heads:
        kv0, kv1 = split_range(kv_heads, tp, rank)
        return kv0 * group, kv1 * group, kv0, kv1
    # More ranks than KV heads: KV head h is replicated on ranks split_range(tp, kv_heads, h), each
    # taking a share of its `group` query heads (at least one each, as tp <= heads).
    for h in range(kv_heads):
        r0, r1 = split_range(tp, kv_heads, h)
        if r0 <= rank < r1:
            s0, s1 = split_range(group, r1 - r0, rank - r0)
            return h * group + s0, h * group + s1, h, h + 1
    raise AssertionError("unreachable: every rank belongs to a KV head")


def plan_shards(mc: ModelConfig, tp_size: int, rank: int) -> ShardPlan:
    """The shard of `rank`. Raises ValueError, with the numbers, when the model cannot be split
    `tp_size` ways (more ranks than query heads, intermediate units or vocabulary rows)."""
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} of tp_size {tp_size}")
    if tp_size > mc.num_heads:
        raise ValueError(f"tp_size {tp_size} exceeds the model's {mc.num_heads} attention heads: "
                         f"every rank needs at least one (this model has {mc.num_kv_heads} KV heads)")
    q0, q1, kv0, kv1 = _head_ranges(mc.num_heads, mc.num_kv_heads, tp_size, rank)
    unit = QK if mc.intermediate_size % QK == 0 else 1
    if mc.intermediate_size // unit < tp_size:
        raise ValueError(f"tp_size {tp_size}: the MLP's {mc.intermediate_size} intermediate columns cannot be split")
    i0, i1 = split_range(mc.intermediate_size, tp_size, rank, unit)
    chunk = -(-mc.vocab_size // tp_size)
    v0, v1 = min(rank * chunk, mc.vocab_size), min((rank + 1) * chunk, mc.vocab_size)
    if v1 <= v0:
        raise ValueError(f"tp_size {tp_size}: the vocabulary of {mc.vocab_size} tokens cannot be split")
    return ShardPlan(tp_size, rank, mc.head_dim, q0, q1, kv0, kv1, i0, i1, v0, v1, chunk)


def _rows(w: Weight, start: int, end: int) -> Weight:
    if isinstance(w, QuantBlocks):
        return QuantBlocks(w.kind, w.q[start:end].contiguous(), w.d[start:end].contiguous(),
                           None if w.m is None else w.m[start:end].contiguous())
    return w[start:end].contiguous()


def _cols(w: Weight, start: int, end: int, name: str) -> Weight:
    """Columns (K) [start, end): quantized weights only at block boundaries."""
    if isinstance(w, QuantBlocks):
        if start % QK or end % QK:
            raise ValueError(f"{name}: a row-parallel cut at columns [{start}, {end}) splits a quantized "
                             f"block of {QK}; this model cannot run quantized at this tp_size")
        gs = scale_group(w.kind)  # weights per scale: 16 for kind 6, else 32
        b0, b1 = start // gs, end // gs
        return QuantBlocks(w.kind, w.q[:, start:end].contiguous(), w.d[:, b0:b1].contiguous(),
                           None if w.m is None else w.m[:, b0:b1].contiguous())
    return w[:, start:end].contiguous()


def shard_weight(name: str, w: Weight, plan: ShardPlan) -> Weight:
    """This rank's part of the Hugging Face-named tensor `w` (norms and other 1-D tensors whole)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    D = plan.head_dim
    if module == "q_proj":
        return _rows(w, plan.q_start * D, plan.q_end * D)
    if module in ("k_proj", "v_proj"):
        return _rows(w, plan.kv_start * D, plan.kv_end * D)
    if module in ("gate_proj", "up_proj"):
        return _rows(w, plan.inter_start, plan.inter_end)
    if module in ("embed_tokens", "lm_head"):
        return _rows(w, plan.vocab_start, plan.vocab_end)
    if module == "o_proj" and parts[-1] == "weight":
        return _cols(w, plan.q_start * D, plan.q_end * D, name)
    if module == "down_proj" and parts[-1] == "weight":
        return _cols(w, plan.inter_start, plan.inter_end, name)
    return w


def shard_weights(weights: Iterable[tuple[str, Weight]], plan: ShardPlan) -> Iterator[tuple[str, Weight]]:
    """`weights` with every tensor cut to this rank's part (see shard_weight)."""
    for name, w in weights:
        yield name, shard_weight(name, w, plan)
