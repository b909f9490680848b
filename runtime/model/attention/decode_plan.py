"""How the portable backend splits a decode batch: shared-prefix segments for cascade attention,
and padded buckets of similar lengths. Pure functions of slot indices and lengths."""

from __future__ import annotations

import torch

# Cost model of the decode plan, in gathered K/V rows: one more attention call per layer (a
# bucket or a shared segment) costs about as much as gathering and attending this many rows.
CALL_COST_ROWS = 256


def shared_prefix_segments(idx: torch.Tensor, seq_lens: list[int], min_prefix: int,
                           call_cost: int = CALL_COST_ROWS) -> tuple[list[tuple[list[int], int, int]], list[int]]:
    """Split each request's keys into shared segments and a private suffix.

    idx: (B, L) slot indices of the requests' rows (L >= max seq_len). Returns (segments,
    suffix_starts): each segment (rows, start, end) says that those rows (>= 2) hold the same
    slots at positions start..end-1, with end - start >= min_prefix; request i's positions
    0..suffix_starts[i]-1 are covered by exactly one segment each, in order, and
    suffix_starts[i] < seq_lens[i]. Segments nest like a trie of the rows, with edges shorter
    than min_prefix (or saving less than `call_cost` rows) folded into their children."""
    B, L = idx.shape
    pos = torch.arange(L, device=idx.device)
    lens = torch.tensor(seq_lens, device=idx.device)
    # A distinct negative sentinel from seq_len - 1 on: the last key is never shared (it is the
    # new token's, and a suffix must not be empty), and stale slots beyond it are ignored.
    sentinel = -1 - torch.arange(B, device=idx.device)
    keyed = torch.where(pos[None, :] < lens[:, None] - 1, idx, sentinel[:, None])
    _, rank = torch.unique(keyed, dim=0, return_inverse=True)  # rows are distinct: a permutation
    order = torch.empty_like(rank)
    order[rank] = torch.arange(B, device=idx.device)
    srt = keyed[order]
    lcp = (srt[1:] != srt[:-1]).to(torch.int8).argmax(1).tolist()  # first mismatch (one exists)
    order_l = order.tolist()

    segments: list[tuple[list[int], int, int]] = []
    suffix_starts = [0] * B
    stack = [(0, B - 1, 0)]  # sorted rows lo..hi share their first `base` slots
    while stack:
        lo, hi, base = stack.pop()
        if lo == hi:
            suffix_starts[order_l[lo]] = base
            continue
        depth = min(lcp[lo:hi])
        if depth - base >= min_prefix and (hi - lo) * (depth - base) >= call_cost:
            segments.append((order_l[lo:hi + 1], base, depth))
            base = depth
        start = lo
        for i in range(lo, hi):
            if lcp[i] == depth:
                stack.append((start, i, base))
                start = i + 1
        stack.append((start, hi, base))
    return segments, suffix_starts


def pad_buckets(lengths: list[int], call_cost: int = CALL_COST_ROWS) -> tuple[list[list[int]], int]:
    """Partition requests into buckets minimizing sum(bucket size * its longest length) +
    call_cost per bucket. Optimal among partitions into runs of the lengths sorted longest
    first that break only where the length has dropped by 1/8 since the last break candidate
    (so the work stays small: O(log(max/min)^2)). Returns (buckets of request indices, the cost)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ls = [lengths[i] for i in order]
    cands = [0]
    for i in range(1, len(ls)):
        if 8 * ls[i] <= 7 * ls[cands[-1]]:
            cands.append(i)
    ends = [*cands[1:], len(ls)]
    best, cut = {0: 0}, {}
    for j in ends:
        best[j], cut[j] = min((best[i] + (j - i) * ls[i] + call_cost, i) for i in cands if i < j)
    buckets, j = [], len(ls)
    while j:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1], best[len(ls)]
