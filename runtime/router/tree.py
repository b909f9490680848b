"""`ApproxTree`: the router's guess of what one worker holds in its prefix cache.

A radix tree over the text (not tokens) the router has sent to that worker. It only ever sees
request texts, never the worker's evictions, so it is an approximation; it bounds itself by
evicting least recently used leaves once it holds more than `max_chars` characters.
"""

from __future__ import annotations

import heapq
import itertools

_CHUNK = 64  # characters compared per slice while hunting a mismatch


def common_prefix_len(a: str, b: str, start: int = 0) -> int:
    """Length of the common prefix of `a` and `b[start:]` (slice comparisons, C speed)."""
    n = min(len(a), len(b) - start)
    if a[:n] == b[start:start + n]:
        return n
    i = 0
    while a[i:i + _CHUNK] == b[start + i:start + i + _CHUNK]:
        i += _CHUNK
    while a[i] == b[start + i]:
        i += 1
    return i


class _Node:
    __slots__ = ("label", "children", "parent", "last_access")

    def __init__(self, label: str, parent: _Node | None, tick: int) -> None:
        self.label = label
        self.children: dict[str, _Node] = {}
        self.parent = parent
        self.last_access = tick


class ApproxTree:
    """Prefix tree over strings with LRU eviction by size.

    `insert(text)` records `text`; `match(text)` is the length of the longest recorded prefix of
    `text`; `size` is the number of characters stored (sum of edge labels), kept <= `max_chars`
    after every insert. `check_integrity()` verifies the structure and the size count."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        self._clock = itertools.count(1)
        self.root = _Node("", None, 0)
        self.size = 0

    def match(self, text: str) -> int:
        """Characters of `text` found as a recorded prefix. Changes nothing: only `insert`
        (text actually sent to the worker) refreshes a path's recency."""
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            common = common_prefix_len(child.label, text, pos)
            pos += common
            if common < len(child.label):
                break
            node = child
        return pos

    def insert(self, text: str) -> None:
        """Record `text`, then evict least recently used leaves while over `max_chars`."""
        node, pos, tick = self.root, 0, next(self._clock)
        node.last_access = tick
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                node.children[text[pos]] = _Node(text[pos:], node, tick)
                self.size += len(text) - pos
                break
            common = common_prefix_len(child.label, text, pos)
            if common < len(child.label):
                child = self._split(child, common)
            child.last_access = tick
            pos += common
            node = child
        if self.size > self.max_chars:
            self.evict(self.size - self.max_chars)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut `child`'s label at `at`; returns the new upper node (holding label[:at])."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child.label)
        upper = _Node(child.label[:at], parent, child.last_access)
        parent.children[upper.label[0]] = upper
        child.label = child.label[at:]
        child.parent = upper
        upper.children[child.label[0]] = child
        return upper

    def evict(self, chars: int) -> int:
        """Drop least recently used leaves until `chars` characters are gone (or the tree is
        empty); returns the characters dropped."""
        heap = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        dropped = 0
        while heap and dropped < chars:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.label[0]]
            dropped += len(leaf.label)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.size -= dropped
        return dropped

    def clear(self) -> None:
        self.root.children.clear()
        self.size = 0

    def _leaves(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            else:
                out.append(n)
        return out

    def check_integrity(self) -> None:
        """Raise AssertionError unless every edge is non-empty, keyed by its first character,
        linked to its parent, and the labels add up to `size`."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                assert child.label and child.label[0] == key, (key, child.label)
                assert child.parent is node
                total += len(child.label)
                stack.append(child)
        assert total == self.size, (total, self.size)
        assert self.size <= self.max_chars, (self.size, self.max_chars)
