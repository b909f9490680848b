"""NoPrefixCache: the no-sharing cache, same interface as RadixCache, storing nothing.

Every match is empty (the root), every insert reports the whole key as already cached so the
caller frees all of its slots, and every size is 0. Use it to run without prefix sharing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from radixflow.radix.base import (
    CacheIntegrityError,
    CacheUsageError,
    MatchResult,
    PrefixCache,
    TreeNode,
    empty_slots,
)


class NoPrefixCache(PrefixCache):
    """A prefix cache that never holds a slot; ``free_fn`` is therefore never called."""

    def __init__(self, free_fn: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self._free_fn = free_fn
        self.root = TreeNode(0, [], empty_slots(), None)

    @property
    def shares_prefixes(self) -> bool:
        return False

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        return MatchResult(slots=empty_slots(), node=self.root)

    def insert(self, key: Sequence[int], slots: torch.Tensor) -> int:
        if slots.dim() != 1 or slots.numel() != len(key):
            raise ValueError(f"insert: slots shape {tuple(slots.shape)} != ({len(key)},)")
        return len(key)

    def lock(self, node: TreeNode) -> None:
        if node is not self.root:
            raise CacheUsageError(f"NoPrefixCache can only lock its root, got {node}")

    def unlock(self, node: TreeNode) -> None:
        if node is not self.root:
            raise CacheUsageError(f"NoPrefixCache can only unlock its root, got {node}")

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def num_nodes(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    def all_slots(self) -> torch.Tensor:
        return empty_slots()

    def check_integrity(self) -> None:
        r = self.root
        if r.children or r.key or r.value.numel() or r.lock_ref or r.parent is not None:
            raise CacheIntegrityError(f"NoPrefixCache root must stay empty: {r}")
