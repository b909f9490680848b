"""The radix tree prefix cache: unit tests per operation, then a stateful property test
against a brute-force model (a dict from every cached prefix to the slot of its last token)."""

from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixflow.radix import (
    CacheIntegrityError,
    CacheUsageError,
    MatchResult,
    NoPrefixCache,
    RadixCache,
)
from radixflow.radix.tree import match_len


class Recorder:
    """A free_fn that remembers every slot it was given, in order."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, slots: torch.Tensor) -> None:
        assert slots.dtype == torch.int64 and slots.numel() > 0
        self.calls.append(slots.tolist())

    @property
    def flat(self) -> list[int]:
        return [s for call in self.calls for s in call]


def s(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def end_depth(r: MatchResult) -> int:
    """Tokens from the root to the end of the result's node."""
    node, depth = r.node, 0
    while node.parent is not None:
        depth += len(node.key)
        node = node.parent
    return depth


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def cache(rec: Recorder) -> RadixCache:
    return RadixCache(rec)


# -- match / insert ------------------------------------------------------------------------


def test_empty_tree_matches_nothing(cache: RadixCache) -> None:
    for key in ([], [1, 2, 3]):
        r = cache.match_prefix(key)
        assert r.node is cache.root and r.length == 0 and r.slots.dtype == torch.int64
    assert cache.total_size() == 0 and cache.num_nodes() == 0
    cache.check_integrity()


def test_insert_returns_already_cached_length(cache: RadixCache) -> None:
    assert cache.insert([1, 2, 3], s(10, 11, 12)) == 0
    assert cache.insert([1, 2, 3], s(20, 21, 22)) == 3  # all duplicates: caller frees them
    assert cache.insert([1, 2, 3, 4, 5], s(20, 21, 22, 23, 24)) == 3
    assert cache.insert([1, 2], s(30, 31)) == 2
    assert cache.insert([], s()) == 0
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == [10, 11, 12, 23, 24]
    assert cache.evictable_size() == 5 and cache.num_nodes() == 3  # [1,2] split [1,2,3]
    cache.check_integrity()


def test_insert_copies_the_slots(cache: RadixCache) -> None:
    slots = s(5, 6, 7)
    cache.insert([1, 2, 3], slots)
    slots[:] = 0
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [5, 6, 7]


def test_insert_rejects_length_mismatch(cache: RadixCache) -> None:
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], s(1, 2))


def test_match_splits_a_node_so_the_result_ends_at_the_match(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], s(10, 11, 12, 13))
    (whole,) = cache.root.children.values()
    r = cache.match_prefix([1, 2, 9])
    assert r.slots.tolist() == [10, 11] and r.node.key == [1, 2] and end_depth(r) == 2
    assert cache.num_nodes() == 2
    # The old node keeps its identity and its end: it is now the lower half.
    assert whole.key == [3, 4] and whole.parent is r.node and whole.value.tolist() == [12, 13]
    cache.check_integrity()


def test_match_of_whole_node_does_not_split(cache: RadixCache) -> None:
    cache.insert([1, 2, 3], s(10, 11, 12))
    r = cache.match_prefix([1, 2, 3, 4, 5])
    assert r.length == 3 and cache.num_nodes() == 1 and end_depth(r) == 3


def test_insert_diverging_inside_a_node_splits_it(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], s(10, 11, 12, 13))
    assert cache.insert([1, 2, 7, 8], s(10, 11, 22, 23)) == 2
    assert cache.num_nodes() == 3
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == [10, 11, 12, 13]
    assert cache.match_prefix([1, 2, 7, 8]).slots.tolist() == [10, 11, 22, 23]
    assert sorted(cache.all_slots().tolist()) == [10, 11, 12, 13, 22, 23]
    cache.check_integrity()


def test_key_may_be_tuple_or_tensor(cache: RadixCache) -> None:
    cache.insert((1, 2, 3), s(7, 8, 9))
    assert cache.match_prefix(torch.tensor([1, 2, 3])).length == 3
    assert cache.insert(torch.tensor([1, 2]), s(1, 2)) == 2


def test_long_chunked_mismatch_positions() -> None:
    base = list(range(200))
    for cut in (0, 1, 31, 32, 33, 64, 150, 199):
        other = base[:cut] + [-1] + base[cut + 1:]
        assert match_len(base, other, 0) == cut
        if cut >= 5:
            assert match_len(base[5:], [9] * 5 + other[5:], 5) == cut - 5
    assert match_len(base, base[:50], 0) == 50
    assert match_len(base[:50], base, 0) == 50


@given(st.lists(st.integers(0, 2), max_size=80), st.lists(st.integers(0, 2), max_size=80),
       st.integers(0, 10))
def test_match_len_equals_brute_force(a: list[int], b: list[int], start: int) -> None:
    start = min(start, len(b))
    expect = 0
    while expect < min(len(a), len(b) - start) and a[expect] == b[start + expect]:
        expect += 1
    assert match_len(a, b, start) == expect


# -- lock / unlock -------------------------------------------------------------------------


def test_lock_moves_the_path_to_protected_and_unlock_back(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], s(1, 2, 3, 4))
    cache.insert([1, 2, 5], s(1, 2, 5))
    r = cache.match_prefix([1, 2, 3, 4])
    cache.lock(r.node)
    assert (cache.protected_size(), cache.evictable_size()) == (4, 1)
    cache.lock(r.node)
    cache.unlock(r.node)
    assert (cache.protected_size(), cache.evictable_size()) == (4, 1)
    cache.check_integrity()
    cache.unlock(r.node)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 5)
    with pytest.raises(AssertionError):  # CacheIntegrityError is an AssertionError
        cache.unlock(r.node)
    cache.check_integrity()


def test_lock_of_root_is_a_noop(cache: RadixCache) -> None:
    cache.insert([1], s(1))
    r = cache.match_prefix([9])
    cache.lock(r.node)
    cache.unlock(r.node)
    assert cache.root.lock_ref == 0 and cache.protected_size() == 0


def test_locked_handle_survives_a_split_below_and_above(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4, 5, 6], s(1, 2, 3, 4, 5, 6))
    r = cache.match_prefix([1, 2, 3, 4])  # splits: [1,2,3,4] + [5,6]
    cache.lock(r.node)
    assert cache.protected_size() == 4
    cache.match_prefix([1, 2, 9])  # splits the locked node above its end
    assert cache.protected_size() == 4 and end_depth(r) == 4
    cache.check_integrity()
    cache.unlock(r.node)
    assert cache.protected_size() == 0
    cache.check_integrity()


# -- evict ---------------------------------------------------------------------------------


def test_evict_takes_least_recently_used_leaf_first(cache: RadixCache, rec: Recorder) -> None:
    cache.insert([1, 1], s(11, 12))
    cache.insert([2, 2], s(21, 22))
    cache.insert([3, 3], s(31, 32))
    cache.match_prefix([1, 1, 5])  # refreshes [1, 1]
    assert cache.evict(1) == 2 and rec.calls[-1] == [21, 22]
    assert cache.evict(2) == 2 and rec.calls[-1] == [31, 32]
    assert cache.match_prefix([1, 1]).length == 2  # still there
    assert cache.evict(100) == 2 and sorted(rec.calls[-1]) == [11, 12]
    assert cache.total_size() == 0 and cache.evict(5) == 0
    assert cache.stats()["evicted_tokens"] == 6
    cache.check_integrity()


def test_split_refreshes_only_the_matched_part(cache: RadixCache, rec: Recorder) -> None:
    cache.insert([1, 1], s(11, 12))
    cache.insert([2], s(21))
    cache.match_prefix([1])  # [1] | [1]: only the upper half was used
    assert cache.evict(1) == 1 and rec.calls == [[12]]
    assert cache.evict(1) == 1 and rec.calls[-1] == [21]


def test_insert_refreshes_lru(cache: RadixCache, rec: Recorder) -> None:
    cache.insert([1], s(1))
    cache.insert([2], s(2))
    cache.insert([1], s(9))  # already cached: refreshes, caller keeps slot 9
    cache.evict(1)
    assert rec.calls == [[2]]


def test_parent_becomes_leaf_and_is_evicted_after_its_children(cache: RadixCache,
                                                               rec: Recorder) -> None:
    cache.insert([1, 2, 3], s(1, 2, 3))
    cache.insert([1, 2, 4], s(1, 2, 4))  # [1,2] -> {[3], [4]}
    cache.insert([7], s(7))  # most recent
    assert cache.evict(2) == 2
    assert rec.flat == [3, 4]  # both leaves; the parent [1,2] is now a leaf, not yet needed
    assert cache.num_nodes() == 2
    cache.check_integrity()
    assert cache.evict(1) == 2 and rec.calls[-1] == [1, 2]  # [1,2] older than [7]
    assert cache.evict(1) == 1 and rec.calls[-1] == [7]


def test_evict_frees_whole_nodes_in_one_call(cache: RadixCache, rec: Recorder) -> None:
    cache.insert([1, 2, 3, 4, 5], s(1, 2, 3, 4, 5))
    cache.insert([6], s(6))
    assert cache.evict(1) == 5  # whole node, one free_fn call
    assert rec.calls == [[1, 2, 3, 4, 5]]


def test_locked_path_is_never_evicted(cache: RadixCache, rec: Recorder) -> None:
    cache.insert([1, 2, 3], s(1, 2, 3))
    cache.insert([1, 2, 4], s(1, 2, 4))
    cache.insert([5, 6], s(5, 6))
    r = cache.match_prefix([1, 2, 3])
    cache.lock(r.node)
    assert cache.evict(100) == 3  # [4] and [5,6]; [1,2] and [3] are locked
    assert sorted(rec.flat) == [4, 5, 6]
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [1, 2, 3]
    assert (cache.evictable_size(), cache.protected_size()) == (0, 3)
    cache.unlock(r.node)
    assert cache.evict(100) == 3 and cache.total_size() == 0
    cache.check_integrity()


def test_lock_of_evicted_node_raises(cache: RadixCache) -> None:
    cache.insert([1, 2], s(1, 2))
    r = cache.match_prefix([1, 2])
    cache.evict(2)
    with pytest.raises(CacheUsageError):
        cache.lock(r.node)


def test_eviction_order_is_deterministic() -> None:
    def run() -> list[list[int]]:
        rec = Recorder()
        c = RadixCache(rec)
        rng = random.Random(7)
        slot = 1
        for _ in range(200):
            key = [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
            if rng.random() < 0.3:
                c.match_prefix(key)
            else:
                r = c.match_prefix(key)
                n = len(key) - r.length
                c.insert(key, torch.cat([r.slots, torch.arange(slot, slot + n)]))
                slot += n
            if rng.random() < 0.1:
                c.evict(rng.randrange(1, 6))
        c.evict(10**9)
        return rec.calls

    assert run() == run()


# -- reset, stats, integrity ---------------------------------------------------------------


def test_reset_frees_everything_and_refuses_while_locked(cache: RadixCache, rec: Recorder) -> None:
    cache.insert([1, 2, 3], s(1, 2, 3))
    cache.insert([4], s(4))
    r = cache.match_prefix([1, 2])
    cache.lock(r.node)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(r.node)
    cache.record_hit(2, 3)
    cache.reset()
    assert sorted(rec.flat) == [1, 2, 3, 4]
    assert cache.total_size() == 0 and cache.num_nodes() == 0
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.stats()["hit_tokens"] == 2  # statistics survive a reset
    with pytest.raises(CacheUsageError):
        cache.lock(r.node)  # a handle from before the reset
    cache.check_integrity()
    cache.reset()  # empty: no free_fn call
    assert len(rec.calls) == 1


def test_stats(cache: RadixCache) -> None:
    assert cache.stats()["hit_rate"] == 0.0
    cache.insert([1, 2], s(1, 2))
    cache.record_hit(0, 4)
    cache.record_hit(3, 4)
    st_ = cache.stats()
    assert st_["queried_tokens"] == 8 and st_["hit_tokens"] == 3 and st_["hit_rate"] == 3 / 8
    assert st_["num_nodes"] == 1 and st_["evicted_tokens"] == 0
    with pytest.raises(ValueError):
        cache.record_hit(5, 4)


def _corrupt_tree() -> RadixCache:
    c = RadixCache(lambda x: None)
    c.insert([1, 2, 3], s(1, 2, 3))
    c.insert([1, 2, 4], s(1, 2, 4))
    c.check_integrity()
    return c


@pytest.mark.parametrize("what, message", [
    ("counter", "evictable counter"),
    ("dup", "slots held twice"),
    ("zero", "slot 0"),
    ("lock", "lock_ref below"),
    ("len", "slots for"),
    ("filed", "filed under"),
    ("empty", "empty non-root"),
    ("parent", "its parent"),
    ("leaves", "eviction candidates"),
])
def test_check_integrity_catches_corruption(what: str, message: str) -> None:
    c = _corrupt_tree()
    mid = c.root.children[1]
    leaf3, leaf4 = mid.children[3], mid.children[4]
    if what == "counter":
        c._evictable += 1
    elif what == "dup":
        leaf4.value = s(3)
    elif what == "zero":
        leaf4.value = s(0)
    elif what == "lock":
        leaf3.lock_ref = 1
    elif what == "len":
        leaf4.value = s(4, 5)
    elif what == "filed":
        mid.children[5] = mid.children.pop(4)
    elif what == "empty":
        leaf4.key, leaf4.value = [], s()
        mid.children[4] = leaf4
    elif what == "parent":
        leaf4.parent = c.root
    elif what == "leaves":
        c._leaves.discard(leaf3)
    with pytest.raises(CacheIntegrityError, match=message):
        c.check_integrity()


def test_page_size_above_one_is_not_implemented_yet() -> None:
    with pytest.raises(NotImplementedError):
        RadixCache(lambda x: None, page_size=16)


def test_match_is_fast_on_a_large_tree() -> None:
    rng = random.Random(0)
    c = RadixCache(lambda x: None)
    systems = [[rng.randrange(50000) for _ in range(300)] for _ in range(10)]
    keys, slot = [], 1
    for _ in range(1500):
        key = rng.choice(systems) + [rng.randrange(50000) for _ in range(rng.randrange(20, 700))]
        keys.append(key)
        r = c.match_prefix(key)
        n = len(key) - r.length
        c.insert(key, torch.cat([r.slots, torch.arange(slot, slot + n)]))
        slot += n
    queries = [rng.choice(keys)[:1000] for _ in range(500)]
    t0 = time.perf_counter()
    for q in queries:
        c.match_prefix(q)
    per_match = (time.perf_counter() - t0) / len(queries)
    assert c.num_nodes() > 1500
    assert per_match < 1e-3, f"match_prefix took {per_match * 1e6:.0f} us"


# -- the no-sharing cache ------------------------------------------------------------------


def test_no_prefix_cache(rec: Recorder) -> None:
    c = NoPrefixCache(rec)
    assert c.insert([1, 2, 3], s(1, 2, 3)) == 3  # caller frees all its slots
    r = c.match_prefix([1, 2, 3])
    assert r.length == 0 and r.node is c.root
    c.lock(r.node)
    c.unlock(r.node)
    assert c.evict(10) == 0 and c.total_size() == 0 and c.all_slots().numel() == 0
    c.reset()
    c.check_integrity()
    assert rec.calls == [] and c.stats()["num_nodes"] == 0
    with pytest.raises(CacheUsageError):
        c.lock(RadixCache(rec).root)


# -- stateful property test against a brute-force model ------------------------------------

POOL = 48
keys = st.lists(st.integers(0, 2), max_size=10)


class RadixMachine(RuleBasedStateMachine):
    """Drives the cache the way a scheduler does: match + lock, allocate slots for the rest
    (evicting if short), then insert + unlock (finish) or free + unlock (abort).

    Model: ``model[prefix] = slot`` for every cached prefix (prefix-closed);
    ``pending``: running requests (key, locked match, slots they own)."""

    def __init__(self) -> None:
        super().__init__()
        self.freed: list[int] = []
        self.cache = RadixCache(lambda t: self.freed.extend(t.tolist()))
        self.pool = list(range(POOL, 0, -1))  # free slots (a stack)
        self.model: dict[tuple[int, ...], int] = {}
        self.pending: list[tuple[list[int], MatchResult, list[int]]] = []

    # model helpers
    def model_match(self, key: list[int]) -> list[int]:
        out = []
        for i in range(len(key)):
            slot = self.model.get(tuple(key[:i + 1]))
            if slot is None:
                break
            out.append(slot)
        return out

    def take_freed(self) -> list[int]:
        """Slots the tree just gave up: each must have been the tree's; back to the pool."""
        freed, self.freed = self.freed, []
        owned = {v: k for k, v in self.model.items()}
        assert len(set(freed)) == len(freed), "a slot freed twice in one call"
        for slot in freed:
            assert slot in owned, f"tree freed slot {slot} it did not own"
            del self.model[owned[slot]]
        self.pool.extend(freed)
        return freed

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self.pool):
            self.cache.evict(n - len(self.pool))
            self.take_freed()
        if n > len(self.pool):
            return None
        return [self.pool.pop() for _ in range(n)]

    def begin(self, key: list[int]) -> tuple[MatchResult, list[int]] | None:
        r = self.cache.match_prefix(key)
        assert r.slots.tolist() == self.model_match(key)
        assert end_depth(r) == r.length
        self.cache.lock(r.node)
        own = self.alloc(len(key) - r.length)
        if own is None:
            self.cache.unlock(r.node)
            return None
        return r, own

    def finish(self, key: list[int], r: MatchResult, own: list[int]) -> None:
        m, node = r.length, r.node
        now = self.model_match(key)
        assert now[:m] == r.slots.tolist(), "a locked prefix changed"
        expect = len(now)
        n = self.cache.insert(key, torch.cat([r.slots, torch.tensor(own, dtype=torch.int64)]))
        assert n == expect and n >= m
        self.pool.extend(own[:n - m])  # duplicates: the caller frees them
        for i in range(n, len(key)):
            self.model[tuple(key[:i + 1])] = own[i - m]
        self.cache.unlock(node)

    @rule(key=keys)
    def insert_now(self, key: list[int]) -> None:
        got = self.begin(key)
        if got is not None:
            r, own = got
            self.finish(key, r, own)

    @rule(key=keys)
    def start_request(self, key: list[int]) -> None:
        got = self.begin(key)
        if got is not None:
            r, own = got
            self.pending.append((key, r, own))

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 100), abort=st.booleans())
    def end_request(self, i: int, abort: bool) -> None:
        key, r, own = self.pending.pop(i % len(self.pending))
        if abort:
            self.pool.extend(own)
            self.cache.unlock(r.node)
        else:
            self.finish(key, r, own)

    @rule(key=keys)
    def match(self, key: list[int]) -> None:
        r = self.cache.match_prefix(key)
        assert r.slots.tolist() == self.model_match(key)
        assert end_depth(r) == r.length

    @rule(n=st.integers(0, 20))
    def evict(self, n: int) -> None:
        before = self.cache.evictable_size()
        locked = {x for _, r, _ in self.pending for x in r.slots.tolist()}
        got = self.cache.evict(n)
        freed = self.take_freed()
        assert got == len(freed)
        assert not locked & set(freed), "a locked slot was evicted"
        assert got >= min(n, before)
        if got < n:
            assert self.cache.evictable_size() == 0
        for prefix in self.model:  # still prefix-closed: only leaves were taken
            assert len(prefix) == 1 or prefix[:-1] in self.model

    @rule()
    def reset(self) -> None:
        if any(r.length for _, r, _ in self.pending):
            with pytest.raises(RuntimeError):
                self.cache.reset()
        else:
            self.cache.reset()
            self.take_freed()
            assert not self.model

    @invariant()
    def consistent(self) -> None:
        c = self.cache
        c.check_integrity()
        protected = {tuple(k[:i + 1]) for k, r, _ in self.pending for i in range(r.length)}
        assert protected <= self.model.keys()
        assert c.protected_size() == len(protected)
        assert c.evictable_size() == len(self.model) - len(protected)
        assert c.total_size() == len(self.model)
        tree = c.all_slots().tolist()
        assert sorted(tree) == sorted(self.model.values())
        held = [x for _, _, own in self.pending for x in own]
        everything = sorted(self.pool + tree + held)
        assert everything == list(range(1, POOL + 1)), "slot leaked or duplicated"
        assert not self.freed


RadixMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixMachine = RadixMachine.TestCase
