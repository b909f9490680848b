"""Which waiting requests to admit first, and the in-batch prefix de-duplication."""

from __future__ import annotations

from collections import defaultdict

from radixflow.radix import RadixCache
from radixflow.radix.base import MatchResult, TreeNode
from radixflow.runtime.req import Req
from radixflow.runtime.scheduler.kv_cache import KVCacheManager

# Beyond this many waiting requests, prefix-aware ordering costs more than it saves (as SGLang).
_LPM_MAX_QUEUE = 128
# A shared uncached prefix at least this long defers later requests to the next round.
IN_BATCH_PREFIX_THRESHOLD = 32
# A shorter one (of at least IN_BATCH_MIN_SHARED tokens) defers them too when computing it once
# saves at least IN_BATCH_SAVE_TOKENS in all: its length times the other waiting requests that
# share it. A batch of programs whose prompts continue a committed prefix with the same few words
# ("Q: What is the sum of ...") computes those words once instead of once per program.
IN_BATCH_MIN_SHARED = 4
IN_BATCH_SAVE_TOKENS = 256


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
    """Detects that a waiting request shares an *uncached* prefix with one admitted in the same
    round, long enough (or shared by enough of `waiting`) to be worth computing once: that request
    is deferred so it hits the cache once the first one computed it."""

    def __init__(self, waiting: list[Req] | None = None) -> None:
        self._tree = RadixCache(lambda slots: None)
        self._next = 1
        self._waiting = waiting or []
        self._saving: dict[tuple[int, ...], int] = {}

    def shares_uncached_prefix(self, tokens: list[int], cached_len: int) -> bool:
        end = self._tree.match_prefix(tokens).length
        shared = end - cached_len
        if shared >= IN_BATCH_PREFIX_THRESHOLD:
            return True
        if shared < IN_BATCH_MIN_SHARED or shared * (len(self._waiting) - 1) < IN_BATCH_SAVE_TOKENS:
            return False
        return self._best_saving(tokens, cached_len, end) >= IN_BATCH_SAVE_TOKENS

    def _best_saving(self, tokens: list[int], start: int, end: int) -> int:
        """The most tokens computing a head tokens[:k] once saves (start + MIN_SHARED <= k <= end):
        (k - start) x (the other waiting requests sharing it). A shorter head can be shared by many
        more requests ("... sum of" by all, "... sum of 1" by a few): each request of such a batch
        must wait for the first, not only those that share its longest head. Counted once per
        head and round, among the first waiting requests."""
        key = tuple(tokens[:end])
        best = self._saving.get(key)
        if best is None:
            lo = start + IN_BATCH_MIN_SHARED
            floor = tokens[:lo]
            depth: list[int] = []  # for each waiting request sharing tokens[:lo]: how far it goes
            for r in self._waiting[:_LPM_MAX_QUEUE]:
                fill = r.fill_ids
                if fill[:lo] == floor:
                    k = lo
                    while k < end and k < len(fill) and fill[k] == tokens[k]:
                        k += 1
                    depth.append(k)
            depth.sort(reverse=True)
            # depth[i] >= k for the i + 1 deepest sharers: the head tokens[:depth[i]] has i + 1 of them
            best = max((depth[i] - start) * i for i in range(len(depth))) if depth else 0
            self._saving[key] = best
        return best

    def add(self, tokens: list[int]) -> None:
        import torch

        slots = torch.arange(self._next, self._next + len(tokens), dtype=torch.int64)
        self._next += len(tokens)
        self._tree.insert(tokens, slots)
