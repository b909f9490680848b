"""From a batch of logits to next tokens: bias, penalties, grammar mask, then sampling.

Order (per DESIGN §5): logit bias -> frequency / presence / repetition penalties ->
min_new_tokens stop masking -> grammar bitmask -> temperature, top-k, top-p, min-p -> sample
with each request's own seeded generator (greedy requests take the argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixflow.runtime.req import Req


@dataclass
class SampleOutput:
    next_ids: list[int]
    # For requests with return_logprob: raw-model logprob of the chosen token and top-k pairs.
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[float, int]] | None]


def top_logprobs_rows(logprobs: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
    """The k most likely (logprob, token_id) pairs of each row of a (N, V) logprob tensor."""
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    vals, ids = logprobs.topk(k, dim=-1)
    return [list(zip(v, i)) for v, i in zip(vals.tolist(), ids.tolist())]


def apply_penalties(logits: torch.Tensor, reqs: list[Req]) -> None:
    """In place: logit bias, frequency/presence penalties (output tokens), repetition penalty
    (prompt + output tokens, Hugging Face / CTRL style)."""
    V = logits.shape[1]
    for i, r in enumerate(reqs):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype,
                                                      device=logits.device))
        if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
            counts = torch.bincount(torch.tensor(r.output_ids, device=logits.device), minlength=V)[:V]
            counts = counts.to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(r.fill_ids)), dtype=torch.int64, device=logits.device)
            ids = ids[ids < V]
            s = logits[i, ids]
            logits[i, ids] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)


def mask_stops_before_min(logits: torch.Tensor, reqs: list[Req]) -> None:
    """Forbid EOS and stop_token_ids while a request has fewer than min_new_tokens outputs."""
    for i, r in enumerate(reqs):
        if len(r.output_ids) < r.params.min_new_tokens:
            stops = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                stops |= r.eos_token_ids
            if stops:
                logits[i, list(stops)] = float("-inf")


def sample_rows(logits: torch.Tensor, reqs: list[Req]) -> list[int]:
    """Temperature, top-k, top-p, min-p, then one draw per row from the request's generator."""
    out: list[int] = []
    greedy = [r.params.is_greedy for r in reqs]
    argmax = logits.argmax(dim=-1).tolist()
    rows = [i for i, g in enumerate(greedy) if not g]
    if not rows:
        return argmax
    sub = logits[rows]
    temps = torch.tensor([reqs[i].params.temperature for i in rows], dtype=sub.dtype, device=sub.device)
    sub = sub / temps[:, None]
    sorted_logits, sorted_ids = sub.sort(dim=-1, descending=True)
    ranks = torch.arange(sub.shape[1], device=sub.device)[None, :]
    top_k = torch.tensor([reqs[i].params.top_k if reqs[i].params.top_k > 0 else sub.shape[1] for i in rows],
                         device=sub.device)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([reqs[i].params.top_p for i in rows], dtype=probs.dtype, device=sub.device)
    cum = probs.cumsum(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    probs = probs.masked_fill((cum - probs) >= top_p[:, None], 0.0)
    min_p = torch.tensor([reqs[i].params.min_p for i in rows], dtype=probs.dtype, device=sub.device)
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    for j, i in enumerate(rows):
        k = torch.multinomial(probs[j], 1, generator=reqs[i].generator).item()
        argmax[i] = int(sorted_ids[j, k])
    out = argmax
    return out


class Sampler:
    """Stateless apart from the batch it is given; grammar masks are applied by the caller's hook."""

    def sample(self, logits: torch.Tensor, reqs: list[Req], grammar_mask_fn=None) -> SampleOutput:
        """logits: fp32 (B, V) of each request's last position; returns the next token per request.

        `grammar_mask_fn(logits)` (optional) masks constrained rows in place after penalties."""
        assert logits.dim() == 2 and logits.shape[0] == len(reqs), (logits.shape, len(reqs))
        want_lp = [r.return_logprob for r in reqs]
        raw_lp = logits.log_softmax(dim=-1) if any(want_lp) else None
        logits = logits.clone()
        apply_penalties(logits, reqs)
        mask_stops_before_min(logits, reqs)
        if grammar_mask_fn is not None:
            grammar_mask_fn(logits)
        next_ids = sample_rows(logits, reqs)
        lps: list[float | None] = [None] * len(reqs)
        tops: list[list[tuple[float, int]] | None] = [None] * len(reqs)
        if raw_lp is not None:
            chosen = raw_lp.gather(1, torch.tensor(next_ids, device=logits.device)[:, None])[:, 0].tolist()
            kmax = max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0)
            top_all = top_logprobs_rows(raw_lp, kmax)
            for i, r in enumerate(reqs):
                if r.return_logprob:
                    lps[i] = chosen[i]
                    tops[i] = top_all[i][:r.top_logprobs_num]
        return SampleOutput(next_ids, lps, tops)
