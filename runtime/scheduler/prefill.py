"""Prefill admission: which waiting requests join the next EXTEND step, and how many tokens each."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixflow.radix.base import MatchResult
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.req import Req, ReqStatus
from radixflow.runtime.scheduler.kv_cache import KVCacheManager
from radixflow.runtime.scheduler.schedule_policy import InBatchPrefixTracker, SchedulePolicy
from radixflow.runtime.scheduler.token_ratio import NewTokenRatio


@dataclass
class PrefillBatch:
    """The prefill part of one EXTEND step; every request in `items` has a row and the slots for
    its n new tokens recorded in it."""

    items: list[tuple[Req, int]] = field(default_factory=list)  # (request, tokens to compute)
    chunked: Req | None = None  # the request whose prefill is unfinished after this step, if any
    admitted: list[Req] = field(default_factory=list)  # taken from the waiting queue (the caller removes them)
    prompt_tokens: int = 0  # prompts of first-time admissions
    cached_tokens: int = 0  # their tokens served from the prefix cache


class PrefillAdder:
    """Admits waiting requests against three budgets: tokens per prefill step (max_prefill_tokens,
    chunked_prefill_size), free KV less the reserve for running requests' future tokens (see
    NewTokenRatio), and running-request slots. A chunked prefill continues first; only one
    request is chunked at a time; a request sharing a long uncached prefix with one admitted in
    the same round waits for it (InBatchPrefixTracker). An idle engine always admits one request."""

    def __init__(self, config: EngineConfig, cache: KVCacheManager, policy: SchedulePolicy,
                 ratio: NewTokenRatio) -> None:
        self.config = config
        self.cache = cache
        self.policy = policy
        self.ratio = ratio
        self._budget = 0  # prefill tokens left this round
        self._avail = 0.0  # KV tokens left this round

    def build(self, waiting: list[Req], running: list[Req], chunked: Req | None) -> PrefillBatch | None:
        """The next prefill, chunked continuation first; None when nothing can be admitted. Does
        not change `waiting`; the admitted requests are RUNNING, with their KV allocated."""
        if not waiting and chunked is None:
            return None
        chunk = self.config.chunked_prefill_size if self.config.chunked_prefill_size > 0 else 1 << 30
        self._budget = min(self.config.max_prefill_tokens, chunk)
        self._avail = self.cache.available_tokens() - self.ratio.reserved(running)
        out = PrefillBatch(chunked=chunked)
        if chunked is not None:
            n = min(chunked.seq_len - chunked.kv_len, self._budget)
            if self.cache.extend(chunked, n) is None:
                return None
            out.items.append((chunked, n))
            self._budget -= n
            self._avail -= n
        slots_left = self.config.max_running_requests - len(running) - len(out.items)
        if waiting and self._budget > 0 and slots_left > 0:
            self._admit_waiting(out, waiting, running, slots_left)
        return out if out.items else None

    def _admit_waiting(self, out: PrefillBatch, waiting: list[Req], running: list[Req], slots_left: int) -> None:
        tracker = InBatchPrefixTracker(waiting)
        if out.chunked is not None:  # its uncached remainder is being computed: others wait for it
            tracker.add(out.chunked.fill_ids)
        for req, match in self.policy.order(waiting):
            if slots_left <= 0 or self._budget <= 0:
                break
            fill = req.fill_ids
            need = len(fill) - match.length
            if self.cache.shares_prefixes and tracker.shares_uncached_prefix(fill, match.length):
                continue  # another request in this batch computes the shared part first
            n = min(need, self._budget)
            chunked = n < need
            if chunked and out.chunked is not None:
                break  # one chunked prefill at a time
            # Room for future decode tokens; an idle engine always admits one request (retraction
            # covers it if it grows beyond the pool later), so nothing can wait forever.
            idle = not running and not out.items
            future = 0 if chunked or idle else self.ratio.future(req)
            if n + future > self._avail or not self._take(out, req, match, n):
                break
            tracker.add(fill)
            out.items.append((req, n))
            out.admitted.append(req)
            self._budget -= n
            self._avail -= n + future
            slots_left -= 1
            if chunked:
                out.chunked = req

    def _take(self, out: PrefillBatch, req: Req, match: MatchResult, n: int) -> bool:
        """Give req its row, cached prefix and n new slots; False (nothing held) if the pool can't."""
        if not self.cache.admit(req, match):
            return False
        if self.cache.extend(req, n) is None:
            self.cache.release(req)
            return False
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = match.length
            self.cache.tree.record_hit(match.length, len(req.fill_ids))
            out.cached_tokens += match.length
            out.prompt_tokens += req.prompt_len
        req.status = ReqStatus.RUNNING
        return True
