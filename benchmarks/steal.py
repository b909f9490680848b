"""CPU steal: the time the hypervisor ran other guests on this VM's CPUs. On a shared VM it is what
makes wall times swing, so the benchmarks print it next to their figures."""

from __future__ import annotations


def cpu_stolen() -> tuple[int, int] | None:
    """(steal, total) jiffies over all CPUs so far, from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) > 7 else None


def steal_between(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The fraction of CPU time stolen between two cpu_stolen() readings (None if unknown)."""
    if before is None or after is None:
        return None
    return (after[0] - before[0]) / max(after[1] - before[1], 1)
