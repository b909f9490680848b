"""From a batch of logits to next tokens: bias, penalties, grammar mask, then sampling.

Order (per DESIGN §5): logit bias -> frequency / presence / repetition penalties ->
min_new_tokens stop masking -> grammar bitmask -> temperature, top-k, top-p, min-p -> sample
with each request's own seeded generator (greedy requests take the argmax).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from radixflow.runtime.req import Req
from radixflow.runtime.request_faults import Fault, batched_or_each

# The grammar hook: masks the constrained rows of (B, V) logits in place and returns
# {row: exception} for the rows whose grammar raised.
GrammarMaskFn = Callable[[torch.Tensor], dict[int, Exception]]


@dataclass
class SampleOutput:
    next_ids: list[int | None]  # None for a row in `faults`
    # For requests with return_logprob: raw-model logprob of the chosen token and top-k pairs.
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[float, int]] | None]
    # Rows whose request failed here: row -> (stage, exception). The other rows are sampled
    # as if these were not in the batch.
    faults: dict[int, Fault] = field(default_factory=dict)


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


def _cpu_rows(t: torch.Tensor):
    """t (B, V) as a numpy array when it is an fp32 CPU tensor, else None. Row-wise max and argmax
    over a 49k vocabulary cost ~30 us in numpy; torch splits them over its OpenMP threads, whose
    wake-up (they sleep between ops: OMP_WAIT_POLICY=PASSIVE) costs 10x that, once per op and step."""
    return t.numpy() if t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 else None


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The first index of each row's maximum (torch's and numpy's rule alike)."""
    a = _cpu_rows(logits)
    return (a.argmax(axis=-1) if a is not None else logits.argmax(dim=-1)).tolist()


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row's maximum is finite: False for a NaN or +inf anywhere, or -inf everywhere."""
    a = _cpu_rows(logits)
    return np.isfinite(a.max(axis=-1)).tolist() if a is not None else torch.isfinite(logits.amax(dim=-1)).tolist()


def sample_rows(logits: torch.Tensor, reqs: list[Req]) -> list[int]:
    """Temperature, top-k, top-p, min-p, then one draw per row from the request's generator."""
    greedy = [r.params.is_greedy for r in reqs]
    argmax = argmax_rows(logits)
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
    return argmax


def output_logprobs(raw_lp: torch.Tensor, next_ids: list[int],
                    reqs: list[Req]) -> list[tuple[float, list[tuple[float, int]]]]:
    """Per row of (B, V) raw logprobs: the chosen token's logprob and the request's top pairs."""
    assert raw_lp.shape[0] == len(next_ids) == len(reqs), (raw_lp.shape, len(next_ids), len(reqs))
    chosen = raw_lp.gather(1, torch.tensor(next_ids, device=raw_lp.device)[:, None])[:, 0].tolist()
    tops = top_logprobs_rows(raw_lp, max(r.top_logprobs_num for r in reqs))
    return [(c, t[:r.top_logprobs_num]) for c, t, r in zip(chosen, tops, reqs)]


def _needs_adjusting(r: Req) -> bool:
    p = r.params
    return bool(p.logit_bias or ((p.frequency_penalty or p.presence_penalty) and r.output_ids)
                or p.repetition_penalty != 1.0 or len(r.output_ids) < p.min_new_tokens)


def _adjusted(logits: torch.Tensor, reqs: list[Req], faults: dict[int, Fault]) -> torch.Tensor:
    """A copy of logits after bias, penalties and min_new_tokens masking, or logits itself when no
    request asks for any (the common case: no 200 KB copy per row and step); a row whose request
    makes them raise goes to `faults`."""
    if not any(_needs_adjusting(r) for r in reqs):
        return logits
    work = logits.clone()
    try:
        apply_penalties(work, reqs)
        mask_stops_before_min(work, reqs)
        return work
    except Exception:
        work.copy_(logits)  # undo the rows done before the fault; the faulty row(s) are found below
    for i, r in enumerate(reqs):
        try:
            apply_penalties(work[i:i + 1], [r])
            mask_stops_before_min(work[i:i + 1], [r])
        except Exception as e:
            faults[i] = ("logit penalties", e)
    return work


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return t if len(rows) == t.shape[0] else t[rows]


class Sampler:
    """Stateless apart from the batch it is given; grammar masks are applied by the caller's hook."""

    def sample(self, logits: torch.Tensor, reqs: list[Req],
               grammar_mask_fn: GrammarMaskFn | None = None) -> SampleOutput:
        """logits: fp32 (B, V) of each request's last position, which may be changed in place (the
        grammar masks); returns the next token per request.

        `grammar_mask_fn(logits)` (optional) masks constrained rows in place after penalties.
        A row that raises (penalties, grammar, drawing, logprobs) or has no finite logit left
        fails alone: it is reported in `faults` and the other rows are sampled as usual."""
        assert logits.dim() == 2 and logits.shape[0] == len(reqs), (logits.shape, len(reqs))
        B = len(reqs)
        faults: dict[int, Fault] = {}
        raw_lp = logits.log_softmax(dim=-1) if any(r.return_logprob for r in reqs) else None
        work = _adjusted(logits, reqs, faults)
        if grammar_mask_fn is not None:
            for i, e in grammar_mask_fn(work).items():
                faults.setdefault(i, ("grammar mask", e))
        # NaN or +inf anywhere, or -inf everywhere (all masked), would poison the draw.
        for i, ok in enumerate(finite_rows(work)):
            if not ok:
                faults.setdefault(i, ("sampling", ValueError("no finite logit to sample from")))
        ids = batched_or_each(lambda rs: sample_rows(_rows(work, rs), [reqs[i] for i in rs]),
                              [i for i in range(B) if i not in faults], faults, "sampling")
        lps: list[float | None] = [None] * B
        tops: list[list[tuple[float, int]] | None] = [None] * B
        lp_rows = [i for i in ids if reqs[i].return_logprob]
        if raw_lp is not None and lp_rows:
            got = batched_or_each(lambda rs: output_logprobs(_rows(raw_lp, rs), [ids[i] for i in rs],
                                                             [reqs[i] for i in rs]),
                                  lp_rows, faults, "output logprobs")
            for i, (lp, top) in got.items():
                lps[i], tops[i] = lp, top
        next_ids = [None if i in faults else ids[i] for i in range(B)]
        return SampleOutput(next_ids, lps, tops, faults)
