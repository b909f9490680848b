"""The prefix-cache interface: tree nodes, match results, and the written contract.

Slots are KV-pool indices: int64, CPU, each >= 1 (slot 0 is the padding slot). A cache owns
the slots it stores and hands them back only through the ``free_fn`` given at construction.

Protocol for a caller (the scheduler):

1. ``r = cache.match_prefix(tokens)`` then ``cache.lock(r.node)`` *before* anything else
   can evict (an unlocked node may be evicted by the next ``evict``). The node stays valid
   across later splits: a split never changes where an existing node ends.
2. Compute the rest; then ``n = cache.insert(tokens, slots)`` where ``slots[:prefix_len]``
   are ``r.slots``. The caller frees ``slots[prefix_len:n]`` (duplicates of what the tree
   already held); the tree owns ``slots[n:]`` from now on.
3. ``cache.unlock(r.node)`` (and lock the node of a fresh match if it keeps running).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class CacheIntegrityError(AssertionError):
    """A cache invariant does not hold (bookkeeping bug, or unlock below zero)."""


class CacheUsageError(RuntimeError):
    """An operation that the cache's state forbids (reset while locked, lock of an evicted node)."""


def empty_slots() -> torch.Tensor:
    """An empty int64 CPU slot tensor."""
    return torch.empty(0, dtype=torch.int64)


class TreeNode:
    """One edge of the radix tree: the token span ``key`` whose KV lives in ``value``.

    ``children`` maps a child's first token id to the child. ``lock_ref`` counts the locks
    held on this node or on any node below it; ``last_access`` is a logical clock tick.
    The root has an empty key and value, no parent, and is never locked nor evicted.
    """

    __slots__ = ("id", "key", "value", "parent", "children", "lock_ref", "last_access")

    def __init__(self, node_id: int, key: list[int], value: torch.Tensor,
                 parent: TreeNode | None, last_access: int = 0, lock_ref: int = 0) -> None:
        self.id = node_id
        self.key = key
        self.value = value  # int64 (len(key),)
        self.parent = parent
        self.children: dict[int, TreeNode] = {}
        self.lock_ref = lock_ref
        self.last_access = last_access

    def __repr__(self) -> str:
        head = self.key[:8]
        more = "..." if len(self.key) > 8 else ""
        return (f"TreeNode(id={self.id}, key={head}{more} ({len(self.key)} tokens), "
                f"lock_ref={self.lock_ref}, last_access={self.last_access})")


@dataclass
class MatchResult:
    """The longest cached prefix of a key.

    ``slots``: int64 CPU (m,), the KV slots of the first m tokens. ``node``: the node that
    ends exactly at token m (the root when m == 0); lock this one.
    """

    slots: torch.Tensor
    node: TreeNode

    @property
    def length(self) -> int:
        """m, the number of matched tokens."""
        return int(self.slots.numel())


class PrefixCache(ABC):
    """A store of token-sequence -> KV-slot mappings shared between requests.

    Sizes count tokens (== slots) of non-root nodes: ``protected`` those on a locked path,
    ``evictable`` the rest; ``total == evictable + protected``.
    """

    def __init__(self) -> None:
        self._queried_tokens = 0
        self._hit_tokens = 0
        self._evicted_tokens = 0

    @property
    @abstractmethod
    def shares_prefixes(self) -> bool:
        """Whether what one request inserts can be matched by another (False for a cache that
        stores nothing; then a request keeps its own slots until it ends)."""

    @abstractmethod
    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``key``. Splits a node when the match ends inside it, so
        that the result's node ends exactly at the match; refreshes ``last_access`` on the
        matched path. Does not count hit statistics (see ``record_hit``)."""

    @abstractmethod
    def insert(self, key: Sequence[int], slots: torch.Tensor) -> int:
        """Store ``key -> slots`` (``len(slots) == len(key)``); return how many leading
        tokens of ``key`` were already cached. The cache takes ownership of
        ``slots[returned:]`` (it copies them); the caller keeps (and frees) the rest."""

    @abstractmethod
    def lock(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction (``lock_ref += 1`` on each);
        locking the root is a no-op. Raises CacheUsageError for a node no longer in the tree."""

    @abstractmethod
    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``. Raises CacheIntegrityError if ``node`` is not locked."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots if that many are evictable, taking unlocked
        leaves in LRU order (a parent that becomes an unlocked leaf is a candidate too).
        Freed slots go to ``free_fn``; returns how many were freed (may exceed the ask by
        less than one node's length, or fall short only when nothing evictable is left)."""

    @abstractmethod
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (what ``evict`` could free)."""

    @abstractmethod
    def protected_size(self) -> int:
        """Tokens in locked nodes."""

    def total_size(self) -> int:
        """All tokens (slots) the cache holds."""
        return self.evictable_size() + self.protected_size()

    @abstractmethod
    def reset(self) -> None:
        """Drop every entry, freeing all slots through ``free_fn``. Raises CacheUsageError
        (a RuntimeError) if anything is locked. The root (and handles to it) stays valid;
        handles to any other node become invalid. Hit statistics are kept."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Recompute every invariant from scratch; raise CacheIntegrityError naming the first
        one that fails."""

    @abstractmethod
    def all_slots(self) -> torch.Tensor:
        """Every slot the cache holds (int64 CPU), in no particular order."""

    @abstractmethod
    def num_nodes(self) -> int:
        """Number of non-root nodes."""

    def record_hit(self, matched: int, total: int) -> None:
        """Count one lookup of ``total`` tokens of which ``matched`` came from the cache."""
        if not 0 <= matched <= total:
            raise ValueError(f"record_hit: need 0 <= matched <= total, got {matched}, {total}")
        self._queried_tokens += total
        self._hit_tokens += matched

    def stats(self) -> dict[str, float | int]:
        """queried_tokens, hit_tokens, hit_rate (0.0 before any query), evicted_tokens,
        num_nodes, plus the current sizes."""
        q = self._queried_tokens
        return {
            "queried_tokens": q,
            "hit_tokens": self._hit_tokens,
            "hit_rate": self._hit_tokens / q if q else 0.0,
            "evicted_tokens": self._evicted_tokens,
            "num_nodes": self.num_nodes(),
            "evictable_tokens": self.evictable_size(),
            "protected_tokens": self.protected_size(),
        }
