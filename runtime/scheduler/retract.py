"""Retraction: taking running requests back to the waiting queue when decode runs out of KV."""

from __future__ import annotations

import logging

from radixflow.runtime.req import Req, ReqStatus
from radixflow.runtime.scheduler.kv_cache import KVCacheManager
from radixflow.runtime.scheduler.token_ratio import NewTokenRatio

logger = logging.getLogger(__name__)


def requeue(req: Req, running: list[Req], waiting: list[Req], cache: KVCacheManager) -> None:
    """Take a running request back to the front of the waiting queue; its KV goes to the
    prefix cache, so re-admission recomputes little (retraction, jump-forward)."""
    if req in running:
        running.remove(req)
    cache.release(req)
    req.status = ReqStatus.WAITING
    waiting.insert(0, req)


def ensure_decode_room(running: list[Req], waiting: list[Req], chunked: Req | None,
                       cache: KVCacheManager, ratio: NewTokenRatio) -> tuple[Req | None, int]:
    """Evict, then retract the least-advanced running requests (to the front of `waiting`)
    until each one left gets a slot; a lone running request is kept (it may then be short),
    unless a chunked prefill holds KV: that is paused last. Returns (the chunked request still
    in prefill, or None if it was paused; how many requests were retracted)."""
    retracted = 0
    while running and cache.available_tokens() < len(running):
        if len(running) == 1 and chunked is None:
            break
        victim = min(running, key=lambda r: (len(r.output_ids), -r.prompt_len))
        requeue(victim, running, waiting, cache)
        victim.retractions += 1
        retracted += 1
        ratio.bump()
        logger.info("retracted %s to free KV (%d running left)", victim.rid, len(running))
    if running and cache.available_tokens() < len(running) and chunked is not None:
        # Last resort: pause the chunked prefill; its computed part stays in the cache.
        cache.release(chunked)
        if not chunked.input_logprobs_done:  # they will be recomputed from the start
            chunked.pending_input_logprobs, chunked.pending_input_top = [], []
        chunked.status = ReqStatus.WAITING
        waiting.insert(0, chunked)
        return None, retracted + 1
    return chunked, retracted
