"""KV bookkeeping for requests: rows, slots, the prefix cache, eviction, and the pool invariant."""

from __future__ import annotations

import torch

from radixflow.radix import NoPrefixCache, PrefixCache, RadixCache
from radixflow.runtime.model.memory_pool import ReqToTokenPool, TokenAllocator
from radixflow.runtime.req import Req


class KVCacheManager:
    """Owns the allocator, the request-to-token rows and the prefix cache.

    Every slot is at any time in exactly one of: the allocator's free list, the prefix cache
    (evictable or protected), or a running request's private range `row[prefix_len:kv_len]`.
    `check_invariant(running)` verifies that count.
    """

    def __init__(self, allocator: TokenAllocator, req_to_token: ReqToTokenPool,
                 disable_radix_cache: bool = False) -> None:
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.tree: PrefixCache = (NoPrefixCache(allocator.free) if disable_radix_cache
                                  else RadixCache(allocator.free))
        self.evicted_tokens = 0

    @property
    def shares_prefixes(self) -> bool:
        """Whether cached prefixes are shared between requests (False with the radix cache off)."""
        return self.tree.shares_prefixes

    @property
    def pool_size(self) -> int:
        return self.allocator.num_slots

    def available_tokens(self) -> int:
        """Slots obtainable now: free plus evictable."""
        return self.allocator.available() + self.tree.evictable_size()

    def alloc(self, n: int) -> torch.Tensor | None:
        """n slots, evicting unlocked cache entries if needed; None if even that is not enough."""
        short = n - self.allocator.available()
        if short > 0:
            self.evicted_tokens += self.tree.evict(short)
        return self.allocator.alloc(n)

    def prefix_limit(self, req: Req) -> int:
        """How many leading tokens of fill_ids may come from the cache (at least one is computed;
        tokens whose input logprobs are wanted must be computed too)."""
        limit = req.seq_len - 1
        if not req.input_logprobs_done:
            limit = min(limit, max(0, req.logprob_start_len - 1))
        return limit

    def match(self, req: Req) -> tuple[int, object]:
        """Length and node of the cached prefix for req (no lock taken)."""
        m = self.tree.match_prefix(req.fill_ids[:self.prefix_limit(req)])
        return m.length, m

    def admit(self, req: Req, match) -> bool:
        """Give req a row and its cached prefix (locked). False if no row is free."""
        row = self.req_to_token.alloc()
        if row is None:
            return False
        self.tree.lock(match.node)
        req.row, req.last_node = row, match.node
        req.prefix_len = req.kv_len = match.length
        if match.length:
            self.req_to_token.write(row, 0, match.slots)
        return True

    def extend(self, req: Req, n: int) -> torch.Tensor | None:
        """Allocate slots for the next n tokens of req and record them in its row."""
        slots = self.alloc(n)
        if slots is not None:
            self.req_to_token.write(req.row, req.kv_len, slots)
        return slots

    def cache_prefix(self, req: Req) -> None:
        """Insert fill_ids[:kv_len] into the cache mid-flight (after a prefill chunk) and move
        the request's lock to the new, longer path."""
        if not self.tree.shares_prefixes:
            return  # nothing is shared: the request keeps its own slots until it ends
        tokens = req.fill_ids[:req.kv_len]
        slots = self.req_to_token.read(req.row, 0, req.kv_len)
        cached = self.tree.insert(tokens, slots)
        self.allocator.free(slots[req.prefix_len:cached])
        m = self.tree.match_prefix(tokens)
        assert m.length == req.kv_len, (m.length, req.kv_len)
        self.req_to_token.write(req.row, 0, m.slots)
        self.tree.lock(m.node)
        self.tree.unlock(req.last_node)
        req.last_node, req.prefix_len = m.node, req.kv_len

    def release(self, req: Req) -> None:
        """Hand req's KV to the cache (or free it) and give back its row and lock."""
        if req.row is None:
            return
        slots = self.req_to_token.read(req.row, 0, req.kv_len)
        cached = self.tree.insert(req.fill_ids[:req.kv_len], slots)
        self.allocator.free(slots[req.prefix_len:cached])
        self.tree.unlock(req.last_node)
        self.req_to_token.free(req.row)
        req.row, req.last_node = None, None
        req.prefix_len = req.kv_len = 0

    def held_by_requests(self, running: list[Req]) -> int:
        return sum(r.kv_len - r.prefix_len for r in running if r.row is not None)

    def check_invariant(self, running: list[Req]) -> None:
        """free + evictable + protected + request-private slots == pool size; no slot twice."""
        self.tree.check_integrity()
        free = self.allocator.available()
        ev, prot = self.tree.evictable_size(), self.tree.protected_size()
        held = self.held_by_requests(running)
        total = free + ev + prot + held
        if total != self.pool_size:
            raise AssertionError(f"KV pool accounting broken: free {free} + evictable {ev} + protected {prot} "
                                 f"+ held by requests {held} = {total} != pool size {self.pool_size}")
        parts = [self.tree.all_slots()] + [self.req_to_token.read(r.row, r.prefix_len, r.kv_len)
                                           for r in running if r.row is not None]
        used = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        if used.numel() != used.unique().numel():
            raise AssertionError("a KV slot is held twice (by the cache and/or requests)")
