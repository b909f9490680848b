"""Batch building: the ForwardBatch of an EXTEND step (prefill plus mixed decode rows) or a
DECODE step, with each new token's KV slot recorded in its request's row."""

from __future__ import annotations

import torch

from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.req import Req
from radixflow.runtime.scheduler.kv_cache import KVCacheManager


def extend_batch(prefill: list[tuple[Req, int]], running: list[Req], cache: KVCacheManager,
                 device: torch.device | str, mixed: bool) -> tuple[ForwardBatch, list[Req]]:
    """The EXTEND batch computing the next n tokens of each (request, n) of `prefill` (slots
    already in their rows), followed, when `mixed` and the pool has a slot for each, by one
    decode row per running request (its slot allocated and recorded here). Returns the batch and
    the running requests decoded along (empty when none are)."""
    ids, rows, prefix, ext, locs = [], [], [], [], []
    for req, n in prefill:
        ids.extend(req.fill_ids[req.kv_len:req.kv_len + n])
        rows.append(req.row)
        prefix.append(req.kv_len)
        ext.append(n)
        locs.append(cache.req_to_token.read(req.row, req.kv_len, req.kv_len + n))
    # Mixed batch: running requests decode their next token in the same forward (a few more
    # rows of a large matmul cost little), when the pool has a slot for each of them.
    decoding = list(running) if mixed else []
    dec_locs = cache.alloc(len(decoding)) if decoding else None
    if dec_locs is None:
        decoding = []
    for r, loc in zip(decoding, dec_locs if decoding else []):
        cache.req_to_token.write(r.row, r.kv_len, loc.view(1))
        ids.append(r.output_ids[-1])
        rows.append(r.row)
        prefix.append(r.kv_len)
        ext.append(1)
    if decoding:
        locs.append(dec_locs)
    want_input_lp = any(not r.input_logprobs_done for r, _ in prefill)
    fb = ForwardBatch.build(ForwardMode.EXTEND, ids, rows, prefix, ext, torch.cat(locs), device,
                            return_all_logits=want_input_lp, num_decode=len(decoding))
    return fb, decoding


def decode_batch(reqs: list[Req], cache: KVCacheManager, device: torch.device | str) -> ForwardBatch:
    """The DECODE batch of one new token per request; the caller ensured a free slot for each."""
    locs = cache.alloc(len(reqs))
    assert locs is not None, "decode room was ensured"
    for r, loc in zip(reqs, locs):
        cache.req_to_token.write(r.row, r.kv_len, loc.view(1))
    return ForwardBatch.build(ForwardMode.DECODE, [r.output_ids[-1] for r in reqs], [r.row for r in reqs],
                              [r.kv_len for r in reqs], [1] * len(reqs), locs, device)
