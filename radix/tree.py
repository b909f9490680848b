"""RadixCache: the radix tree over token ids behind RadixAttention.

Each non-root node holds a token span (``key``) and the KV slots of those tokens
(``value``); a path from the root spells a cached prefix. Time is a logical clock (one tick
per match/insert), so LRU order, and hence eviction, is deterministic.
"""

from __future__ import annotations

import heapq
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

_CHUNK = 32  # tokens compared per slice while hunting a mismatch


def _as_key(key: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(key, list):
        return key
    if isinstance(key, torch.Tensor):
        return key.tolist()
    return list(key)


def match_len(node_key: list[int], key: list[int], start: int, page_size: int = 1) -> int:
    """Length of the common prefix of ``node_key`` and ``key[start:]``, rounded down to a
    multiple of ``page_size``. Compares slices (C speed), then narrows down by chunks."""
    n = min(len(node_key), len(key) - start)
    if node_key[:n] == key[start:start + n]:
        common = n
    else:
        common = 0
        while node_key[common:common + _CHUNK] == key[start + common:start + common + _CHUNK]:
            common += _CHUNK
        while node_key[common] == key[start + common]:
            common += 1
    return common - common % page_size


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CacheIntegrityError(msg)


class RadixCache(PrefixCache):
    """Radix tree prefix cache (see ``PrefixCache`` for the contract).

    ``free_fn`` receives every slot the tree gives up (eviction, reset) as one int64 CPU
    tensor per call, never empty. Only ``page_size == 1`` is implemented: with pages, keys
    would be matched in page multiples (``match_len(..., page_size)``) and children keyed
    by their first page.
    """

    def __init__(self, free_fn: Callable[[torch.Tensor], None], page_size: int = 1) -> None:
        if page_size != 1:
            raise NotImplementedError(f"RadixCache supports page_size 1 only, got {page_size}")
        super().__init__()
        self.page_size = page_size
        self._free_fn = free_fn
        self._clock = 0
        self._next_id = 0
        self.root = TreeNode(self._take_id(), [], empty_slots(), None)  # kept across resets
        self._clear()

    # -- construction helpers ------------------------------------------------------------

    def _clear(self) -> None:
        self.root.children = {}
        self._evictable = 0
        self._protected = 0
        self._nodes = 0
        self._leaves: set[TreeNode] = set()  # unlocked non-root leaves: eviction candidates

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Cut ``node`` after ``at`` tokens (0 < at < len); return the new upper node.
        ``node`` keeps its identity and its end, so handles held on it stay valid."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key)
        upper = TreeNode(self._take_id(), node.key[:at], node.value[:at].clone(), parent,
                         node.last_access, node.lock_ref)
        upper.children[node.key[at]] = node
        parent.children[node.key[0]] = upper
        node.key = node.key[at:]
        node.value = node.value[at:].clone()
        node.parent = upper
        self._nodes += 1
        return upper

    def _add_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor, tick: int) -> None:
        leaf = TreeNode(self._take_id(), key, value, parent, tick)
        parent.children[key[0]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._evictable += len(key)
        self._nodes += 1

    # -- the contract ----------------------------------------------------------------------

    @property
    def shares_prefixes(self) -> bool:
        return True

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        key = _as_key(key)
        tick = self._tick()
        node = self.root
        node.last_access = tick
        values: list[torch.Tensor] = []
        pos, n = 0, len(key)
        while pos < n:
            child = node.children.get(key[pos])
            if child is None:
                break
            m = match_len(child.key, key, pos)
            split = m < len(child.key)
            if split:
                child = self._split(child, m)
            child.last_access = tick
            values.append(child.value)
            node = child
            pos += m
            if split:
                break
        slots = torch.cat(values) if values else empty_slots()
        return MatchResult(slots=slots, node=node)

    def insert(self, key: Sequence[int], slots: torch.Tensor) -> int:
        key = _as_key(key)
        if slots.dim() != 1 or slots.numel() != len(key):
            raise ValueError(f"insert: slots shape {tuple(slots.shape)} != ({len(key)},)")
        tick = self._tick()
        node = self.root
        node.last_access = tick
        pos, n = 0, len(key)
        while pos < n:
            child = node.children.get(key[pos])
            if child is None:
                break
            m = match_len(child.key, key, pos)
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = tick
            node = child
            pos += m
        if pos < n:
            value = slots[pos:].to("cpu", torch.int64, copy=True)
            self._add_leaf(node, key[pos:], value, tick)
        return pos

    def lock(self, node: TreeNode) -> None:
        path = self._path_to_root(node)
        for x in path:
            if x.lock_ref == 0:
                self._evictable -= len(x.key)
                self._protected += len(x.key)
                self._leaves.discard(x)
            x.lock_ref += 1

    def unlock(self, node: TreeNode) -> None:
        path = self._path_to_root(node)
        if path and path[0].lock_ref <= 0:
            raise CacheIntegrityError(f"unlock of an unlocked node: {node}")
        for x in path:
            x.lock_ref -= 1
            if x.lock_ref == 0:
                self._protected -= len(x.key)
                self._evictable += len(x.key)
                if not x.children:
                    self._leaves.add(x)

    def _path_to_root(self, node: TreeNode) -> list[TreeNode]:
        """Node and its ancestors, root excluded; CacheUsageError if detached from this tree."""
        path = []
        while node is not self.root:
            if node.parent is None:
                raise CacheUsageError(f"node is not in the tree (evicted or reset): {node}")
            path.append(node)
            node = node.parent
        return path

    def evict(self, num_tokens: int) -> int:
        if num_tokens <= 0 or not self._leaves:
            return 0
        heap = [(x.last_access, x.id, x) for x in self._leaves]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        count = 0
        while count < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            leaf.parent = None
            self._leaves.discard(leaf)
            self._evictable -= len(leaf.key)
            self._nodes -= 1
            count += len(leaf.key)
            freed.append(leaf.value)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._leaves.add(parent)
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        self._free_fn(torch.cat(freed))
        self._evicted_tokens += count
        return count

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def num_nodes(self) -> int:
        return self._nodes

    def reset(self) -> None:
        if self._protected:
            raise CacheUsageError(f"reset with {self._protected} tokens locked")
        slots = self.all_slots()
        for child in self.root.children.values():
            child.parent = None  # old handles (but the root) now fail loudly in lock()
        self._clear()
        if slots.numel():
            self._free_fn(slots)

    def all_slots(self) -> torch.Tensor:
        values = [x.value for x in self._walk() if x is not self.root]
        return torch.cat(values) if values else empty_slots()

    def _walk(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(x.children.values())
        return out

    def check_integrity(self) -> None:
        root = self.root
        _require(root.parent is None and not root.key and root.value.numel() == 0,
                 f"root must have no parent, key or value: {root}")
        _require(root.lock_ref == 0, f"root lock_ref must stay 0, is {root.lock_ref}")
        evictable = protected = nodes = 0
        leaves: set[TreeNode] = set()
        values: list[torch.Tensor] = []
        for x in self._walk():
            child_locks = 0
            for first, child in x.children.items():
                _require(child.parent is x, f"{child} is in the children of {x} but its parent "
                         f"is {child.parent}")
                _require(len(child.key) > 0, f"empty non-root node {child}")
                _require(child.key[0] == first, f"{child} is filed under first token {first}")
                child_locks += child.lock_ref
            if x is root:
                continue
            nodes += 1
            _require(x.lock_ref >= child_locks, f"{x}: lock_ref below its children's sum "
                     f"{child_locks}")
            _require(x.last_access <= self._clock, f"{x}: last_access after clock {self._clock}")
            v = x.value
            _require(v.dtype == torch.int64 and v.dim() == 1 and v.device.type == "cpu",
                     f"{x}: value must be int64 CPU 1-D, is {v.dtype} {tuple(v.shape)} {v.device}")
            _require(v.numel() == len(x.key), f"{x}: {v.numel()} slots for {len(x.key)} tokens")
            if x.lock_ref > 0:
                protected += len(x.key)
            else:
                evictable += len(x.key)
                if not x.children:
                    leaves.add(x)
            values.append(v)
        _require(nodes == self._nodes, f"num_nodes counter {self._nodes} != tree walk {nodes}")
        _require(evictable == self._evictable,
                 f"evictable counter {self._evictable} != tree walk {evictable}")
        _require(protected == self._protected,
                 f"protected counter {self._protected} != tree walk {protected}")
        _require(leaves == self._leaves, f"eviction candidates out of sync: walk {len(leaves)} "
                 f"leaves, set {len(self._leaves)}")
        if values:
            slots = torch.cat(values)
            _require(int(slots.min()) >= 1, f"slot {int(slots.min())} < 1 (slot 0 is padding)")
            uniq, counts = torch.unique(slots, return_counts=True)
            dup = uniq[counts > 1]
            _require(dup.numel() == 0, f"slots held twice: {dup[:10].tolist()}")
