"""The model runner as the scheduler sees it: the contract `ModelRunner` fulfils, written down so
that a scheduler can run on any object that keeps it (the unit tests run on a fake)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from radixflow.runtime.model.forward_batch import ForwardBatch
from radixflow.runtime.model.memory_pool import ReqToTokenPool, TokenAllocator


class Runner(Protocol):
    """What the scheduler uses of a model runner: `ModelRunner` (model/model_runner.py), or
    any object with the same contract (the unit tests' fake)."""

    model_config: Any  # .eos_token_ids
    model_path: str
    allocator: TokenAllocator
    req_to_token_pool: ReqToTokenPool
    context_length: int
    device: torch.device

    @property
    def vocab_size(self) -> int: ...

    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 logits of each request's last new token (B, V), hidden states of every new
        token (T, hidden) if batch.return_all_logits else None)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows (N, hidden) -> fp32 logits (N, V) (input logprobs)."""
        ...
