"""The radix tree over token ids (RadixAttention's prefix cache): match, insert, lock, evict.

Imports nothing from ``radixflow.runtime``.
"""

from radixflow.radix.base import (
    CacheIntegrityError,
    CacheUsageError,
    MatchResult,
    PrefixCache,
    TreeNode,
)
from radixflow.radix.no_cache import NoPrefixCache
from radixflow.radix.tree import RadixCache

__all__ = [
    "CacheIntegrityError",
    "CacheUsageError",
    "MatchResult",
    "NoPrefixCache",
    "PrefixCache",
    "RadixCache",
    "TreeNode",
]
