"""The batch one model forward runs on: flat (ragged) tokens of many requests, no padding."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill new tokens, possibly on top of a cached prefix, possibly a chunk
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    """One forward step.

    Device tensors (on the model's device):
      input_ids      int64 (T,)  new tokens of all requests, concatenated in request order
      positions      int64 (T,)  their positions in their sequences
      out_cache_loc  int64 (T,)  KV slot of each new token (the backend writes K/V there)
      req_pool_indices int64 (B,) row of each request in ReqToTokenPool
      seq_lens       int64 (B,)  prefix_len + extend_len (all tokens whose KV exists after this step)
      prefix_lens    int64 (B,)  tokens already in the KV pool before this step
      extend_lens    int64 (B,)  new tokens this step (1 for every request in DECODE)
      extend_start_loc int64 (B,) offset of each request's first new token in input_ids
    CPU lists (same values, for host-side loops and kernel grids):
      seq_lens_cpu, prefix_lens_cpu, extend_lens_cpu
    The model runner computes logits only for each request's last new token (row
    extend_start_loc + extend_lens - 1 of input_ids); when a request wants input logprobs,
    `return_all_logits` is set and the runner also returns the hidden states of every new token.
    A mixed EXTEND batch ends with `num_decode` decoding requests (one new token each), which a
    backend may attend with its decode path; to any other reader they are plain extend requests.
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    extend_start_loc: torch.Tensor
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    return_all_logits: bool = False
    num_decode: int = 0
    # Filled by the attention backend in init_forward_metadata; backend-specific.
    attn_metadata: object = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        mode: ForwardMode,
        input_ids: list[int],
        req_pool_indices: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        out_cache_loc: torch.Tensor,
        device: torch.device | str,
        return_all_logits: bool = False,
        num_decode: int = 0,
    ) -> ForwardBatch:
        """Build from host-side lists; positions run prefix_len .. prefix_len + extend_len - 1."""
        assert len(req_pool_indices) == len(prefix_lens) == len(extend_lens)
        assert sum(extend_lens) == len(input_ids) == out_cache_loc.numel()
        if num_decode:
            assert mode is ForwardMode.EXTEND and all(e == 1 for e in extend_lens[len(extend_lens) - num_decode:])
        if mode is ForwardMode.DECODE:
            assert all(e == 1 for e in extend_lens)
            positions = prefix_lens
        else:
            positions = [p + i for p, e in zip(prefix_lens, extend_lens) for i in range(e)]
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        starts, acc = [], 0
        for e in extend_lens:
            starts.append(acc)
            acc += e

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return cls(
            mode=mode,
            input_ids=t(input_ids),
            positions=t(positions),
            out_cache_loc=out_cache_loc.to(device=device, dtype=torch.int64),
            req_pool_indices=t(req_pool_indices),
            seq_lens=t(seq_lens),
            prefix_lens=t(prefix_lens),
            extend_lens=t(extend_lens),
            extend_start_loc=t(starts),
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=list(prefix_lens),
            extend_lens_cpu=list(extend_lens),
            return_all_logits=return_all_logits,
            num_decode=num_decode,
        )
