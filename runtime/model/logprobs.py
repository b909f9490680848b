"""Input-token logprobs: what the model assigned to each prompt token, from its hidden rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from radixflow.runtime.model.sampler import top_logprobs_rows
from radixflow.runtime.req import Req

# hidden rows (N, hidden) -> fp32 logits (N, V): the model's `compute_logits`.
ComputeLogits = Callable[[torch.Tensor], torch.Tensor]


def input_logprobs(req: Req, hidden: torch.Tensor, start: int, compute_logits: ComputeLogits) -> None:
    """Append to req's pending input logprobs those of the input tokens predicted by one chunk.

    `hidden` (n, hidden) holds the final hidden states of fill_ids[start:start + n]; row i
    predicts token start + i + 1. Only positions in [logprob_start_len, prompt_len) are
    reported; position 0 (predicted by nothing) is reported as (None, token) when asked for."""
    fill, P = req.fill_ids, req.prompt_len
    first = req.logprob_start_len
    if start == 0 and first == 0:
        req.pending_input_logprobs.append((None, fill[0]))
        req.pending_input_top.append(None)
    q_lo, q_hi = max(start + 1, first, 1), min(start + hidden.shape[0] + 1, P)
    if q_lo >= q_hi:
        return
    rows = hidden[q_lo - 1 - start:q_hi - 1 - start]
    lp = compute_logits(rows).log_softmax(dim=-1)
    targets = torch.tensor(fill[q_lo:q_hi], device=lp.device)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    tops = top_logprobs_rows(lp, req.top_logprobs_num)
    req.pending_input_logprobs.extend(zip(chosen, fill[q_lo:q_hi]))
    req.pending_input_top.extend(tops)
