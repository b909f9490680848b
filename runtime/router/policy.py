"""Routing policies: which healthy worker gets a request, given its routing text.

`CacheAwarePolicy` is SGLang's cache_aware policy over our per-worker `ApproxTree`s;
`RoundRobinPolicy` and `RandomPolicy` are the baselines the benchmark compares it with."""

from __future__ import annotations

import abc
import itertools
import random
from dataclasses import dataclass

from radixflow.runtime.router.args import RouterArgs
from radixflow.runtime.router.workers import Worker


@dataclass(frozen=True)
class Choice:
    """The chosen worker; `affinity`: chosen for its cached prefix (not for its load)."""

    worker: Worker
    affinity: bool


class Policy(abc.ABC):
    """`choose(text, workers)` picks one of `workers` (non-empty, healthy); `record(text, worker)`
    notes that `text` was sent to `worker`."""

    @abc.abstractmethod
    def choose(self, text: str, workers: list[Worker]) -> Choice: ...

    def record(self, text: str, worker: Worker) -> None:
        if text:
            worker.tree.insert(text)


class CacheAwarePolicy(Policy):
    """Imbalanced loads -> the least-loaded worker. Else the worker whose tree matches the
    largest share of `text`, when that share reaches `cache_threshold`. Else the least-loaded
    worker, ties going to the one with the smallest tree (the most room to cache)."""

    def __init__(self, args: RouterArgs) -> None:
        self.threshold = args.cache_threshold
        self.abs_threshold = args.balance_abs_threshold
        self.rel_threshold = args.balance_rel_threshold

    def choose(self, text: str, workers: list[Worker]) -> Choice:
        assert workers, "no healthy worker"
        least = min(workers, key=lambda w: (w.in_flight, w.tree.size))
        if self.imbalanced(workers) or not text:
            return Choice(least, False)
        matches = [(w.tree.match(text), -w.in_flight, w) for w in workers]
        best_len, _, best = max(matches, key=lambda m: (m[0], m[1]))
        if best_len > 0 and best_len >= self.threshold * len(text):
            return Choice(best, True)
        return Choice(least, False)

    def imbalanced(self, workers: list[Worker]) -> bool:
        loads = [w.in_flight for w in workers]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.abs_threshold and hi > self.rel_threshold * lo


class RoundRobinPolicy(Policy):
    """Each worker in turn (by position among the healthy ones); no trees kept."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, text: str, workers: list[Worker]) -> Choice:
        return Choice(workers[next(self._counter) % len(workers)], False)

    def record(self, text: str, worker: Worker) -> None:
        pass


class RandomPolicy(Policy):
    """A uniformly random worker (seeded, so runs repeat); no trees kept."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, text: str, workers: list[Worker]) -> Choice:
        return Choice(self._rng.choice(workers), False)

    def record(self, text: str, worker: Worker) -> None:
        pass


def make_policy(args: RouterArgs) -> Policy:
    if args.policy == "cache_aware":
        return CacheAwarePolicy(args)
    if args.policy == "round_robin":
        return RoundRobinPolicy()
    return RandomPolicy()
