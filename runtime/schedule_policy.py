"""Which waiting requests to admit first, and the in-batch prefix de-duplication."""

from __future__ import annotations

from collections import defaultdict

from radixflow.radix import RadixCache
from radixflow.radix.base import MatchResult, TreeNode
from radixflow.runtime.kv_cache import KVCacheManager
from radixflow.runtime.req import Req

# Beyond this many waiting requests, prefix-aware ordering costs more than it saves (as SGLang).
_LPM_MAX_QUEUE = 128
# A shared uncached prefix at least this long defers later requests to the next round.
IN_BATCH_PREFIX_THRESHOLD = 32


class SchedulePolicy:
    """`lpm`: longest cached prefix first; `dfs-weight`: depth-first over the tree, heavier
    subtrees first (keeps requests that share a path together); `fcfs`: arrival order."""

    def __init__(self, policy: str, cache: KVCacheManager) -> None:
        self.policy = policy
        self.cache = cache

    def order(self, waiting: list[Req]) -> list[tuple[Req, MatchResult]]:
        matches = [(r, self.cache.match(r)[1]) for r in waiting]
        if self.policy == "fcfs" or len(waiting) > _LPM_MAX_QUEUE:
            return matches
        if self.policy == "lpm":
            return sorted(matches, key=lambda rm: -rm[1].length)  # stable: ties keep arrival order
        return self._dfs_weight(matches)

    @staticmethod
    def _dfs_weight(matches: list[tuple[Req, MatchResult]]) -> list[tuple[Req, MatchResult]]:
        by_node: dict[int, list[tuple[Req, MatchResult]]] = defaultdict(list)
        weight: dict[int, int] = defaultdict(int)
        root: TreeNode | None = None
        for r, m in matches:
            by_node[id(m.node)].append((r, m))
            node = m.node
            while node is not None:
                weight[id(node)] += 1
                root = node
                node = node.parent
        if root is None:
            return matches
        out: list[tuple[Req, MatchResult]] = []
        stack = [root]
        while stack:
            node = stack.pop()
            out.extend(by_node.get(id(node), []))
            kids = [c for c in node.children.values() if weight.get(id(c))]
            kids.sort(key=lambda c: weight[id(c)])  # heaviest popped first
            stack.extend(kids)
        return out


class InBatchPrefixTracker:
    """Detects that a waiting request shares a long *uncached* prefix with one admitted in the
    same round: that request is deferred so it hits the cache once the first one computed it."""

    def __init__(self) -> None:
        self._tree = RadixCache(lambda slots: None)
        self._next = 1

    def shares_uncached_prefix(self, tokens: list[int], cached_len: int) -> bool:
        m = self._tree.match_prefix(tokens)
        return m.length - cached_len >= IN_BATCH_PREFIX_THRESHOLD

    def add(self, tokens: list[int]) -> None:
        import torch

        slots = torch.arange(self._next, self._next + len(tokens), dtype=torch.int64)
        self._next += len(tokens)
        self._tree.insert(tokens, slots)
