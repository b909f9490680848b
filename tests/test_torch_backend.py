"""TorchAttnBackend on hand-built pools and batches vs dense attention over each request's keys.

Decode batches whose requests share prefix slots (as the radix cache hands them out) take the
cascade path; the rest take padded SDPA. Both must equal dense attention: fp32 within 1e-5.
Run as a script for a per-layer decode microbenchmark (plain vs cascade).
"""

from __future__ import annotations

import time

import pytest
import torch

from radixflow.runtime.model.attention.decode_plan import pad_buckets, shared_prefix_segments
from radixflow.runtime.model.attention.torch_backend import TorchAttnBackend
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.memory_pool import KVPool, ReqToTokenPool, TokenAllocator

LAYERS, HEAD_DIM = 2, 16
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """q (E, Hq, D) at positions prefix.., k/v (prefix + E, Hkv, D) -> (E, Hq * D), float32."""
    group = q.shape[1] // k.shape[1]
    e, s = q.shape[0], k.shape[0]
    mask = torch.arange(s)[None, :] <= prefix + torch.arange(e)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(group, 1).transpose(0, 1),
        v.float().repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(e, -1)


class World:
    """Pools, an allocator and each request's full K/V history per layer (the ground truth)."""

    def __init__(self, kv_heads: int, dtype: torch.dtype = torch.float32, head_dim: int = HEAD_DIM,
                 layers: int = LAYERS, slots: int = 8192, rows: int = 16, context: int = 1024,
                 scatter: bool = False) -> None:
        self.dtype, self.head_dim, self.layers = dtype, head_dim, layers
        self.kv_pool = KVPool(slots, layers, kv_heads, head_dim, dtype)
        self.r2t = ReqToTokenPool(rows, context)
        self.alloc = TokenAllocator(slots)
        self.gen = torch.Generator().manual_seed(0)
        if scatter:  # no two consecutive tokens in consecutive slots
            self.alloc._free = self.alloc._free[torch.randperm(slots, generator=self.gen)]
        self.hist: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.dtype)

    def add_cached(self, row: int, n: int, share_from: int | None = None, shared: int = 0) -> None:
        """Pretend `n` tokens of `row` are cached, the first `shared` of them in the same slots as
        `share_from`'s (a radix-cache hit); the rest in fresh slots."""
        hkv = self.kv_pool.kv_heads
        self.hist[row] = [(torch.empty(0, hkv, self.head_dim, dtype=self.dtype),) * 2] * self.layers
        if shared:
            self.r2t.write(row, 0, self.r2t.read(share_from, 0, shared))
            self.hist[row] = [(k[:shared], v[:shared]) for k, v in self.hist[share_from]]
        slots = self.alloc.alloc(n - shared)
        self.r2t.write(row, shared, slots)
        for layer in range(self.layers):
            k, v = self.randn(n - shared, hkv, self.head_dim), self.randn(n - shared, hkv, self.head_dim)
            self.kv_pool.k_buffer[layer][slots] = k
            self.kv_pool.v_buffer[layer][slots] = v
            old_k, old_v = self.hist[row][layer]
            self.hist[row][layer] = (torch.cat([old_k, k]), torch.cat([old_v, v]))

    def batch(self, mode: ForwardMode, rows: list[int], extend_lens: list[int] | None = None,
              num_decode: int = 0) -> ForwardBatch:
        extend_lens = extend_lens or [1] * len(rows)
        prefix_lens = [self.hist[r][0][0].shape[0] for r in rows]
        loc = self.alloc.alloc(sum(extend_lens))
        off = 0
        for row, p, e in zip(rows, prefix_lens, extend_lens, strict=True):
            self.r2t.write(row, p, loc[off:off + e])  # the caller's job before the forward
            off += e
        return ForwardBatch.build(mode, [0] * sum(extend_lens), rows, prefix_lens, extend_lens, loc, "cpu",
                                  num_decode=num_decode)

    def run_and_check(self, backend: TorchAttnBackend, batch: ForwardBatch, hq: int) -> None:
        backend.init_forward_metadata(batch)
        hkv, T, d = self.kv_pool.kv_heads, batch.num_tokens, self.head_dim
        for layer in range(self.layers):
            q, k, v = self.randn(T, hq, d), self.randn(T, hkv, d), self.randn(T, hkv, d)
            out = backend.forward(q, k, v, layer, batch, d ** -0.5)
            assert out.shape == (T, hq * d) and out.dtype == self.dtype
            start = 0
            for i, row in enumerate(batch.req_pool_indices.tolist()):
                e, p = batch.extend_lens_cpu[i], batch.prefix_lens_cpu[i]
                old_k, old_v = self.hist[row][layer]
                new_k, new_v = torch.cat([old_k, k[start:start + e]]), torch.cat([old_v, v[start:start + e]])
                self.hist[row][layer] = (new_k, new_v)
                ref = dense_attention(q[start:start + e], new_k, new_v, p, d ** -0.5)
                t = TOL[self.dtype]
                torch.testing.assert_close(out[start:start + e].float(), ref, atol=t, rtol=t)
                start += e


def segment_rows(batch: ForwardBatch) -> list[tuple[list[int], int]]:
    """The decode plan's shared segments as (sorted pool rows, length), the parts of a segment
    read in place run by run summed up."""
    rows, total = batch.req_pool_indices, {}
    for s in batch.attn_metadata.segments:
        key = tuple(sorted(rows[s.rows].tolist()))
        total[key] = total.get(key, 0) + s.kv_indices.numel()
    return sorted((list(k), n) for k, n in total.items())


HEADS = pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


@HEADS
@DTYPES
def test_decode_without_sharing_is_plain_padded(heads, dtype):
    hq, hkv = heads
    world = World(hkv, dtype)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=False)
    rows = [3, 0, 5, 7, 1]
    for row, n in zip(rows, [300, 5, 21, 12, 7], strict=True):
        world.add_cached(row, n)
    for _ in range(2):
        batch = world.batch(ForwardMode.DECODE, rows)
        world.run_and_check(backend, batch, hq)
        meta = batch.attn_metadata
        assert meta.segments == [] and len(meta.buckets) == 2  # the 300-token request alone


@HEADS
@DTYPES
def test_cascade_one_group_and_singletons(heads, dtype):
    hq, hkv = heads
    world = World(hkv, dtype)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=False)
    world.add_cached(0, 220)
    for row, n in zip([1, 2, 3], [230, 250, 201], strict=True):
        world.add_cached(row, n, share_from=0, shared=200)
    world.add_cached(4, 150)  # singletons: one long, one short, one sharing too little
    world.add_cached(5, 9)
    world.add_cached(6, 60, share_from=0, shared=30)
    rows = [4, 0, 5, 1, 2, 6, 3]
    for _ in range(3):
        batch = world.batch(ForwardMode.DECODE, rows)
        world.run_and_check(backend, batch, hq)
        assert segment_rows(batch) == [([0, 1, 2, 3], 200)]
        # Consecutive slots are read in place from an fp32 pool; others are gathered.
        (seg,) = batch.attn_metadata.segments
        assert (seg.in_place is not None) == (dtype == torch.float32)


@HEADS
@pytest.mark.parametrize("scatter", [False, True], ids=["runs", "scattered"])
def test_cascade_two_groups_and_nesting(heads, scatter):
    hq, hkv = heads
    world = World(hkv, scatter=scatter)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=False)
    world.add_cached(0, 110)
    for row in (1, 2, 9):
        world.add_cached(row, 100 + 7 * row, share_from=0, shared=100)
    world.add_cached(3, 330)
    for row in (4, 5, 6):
        world.add_cached(row, 300 + row, share_from=3, shared=300)
    world.add_cached(7, 620, share_from=3, shared=300)  # and 300 more with request 8
    world.add_cached(8, 630, share_from=7, shared=600)
    batch = world.batch(ForwardMode.DECODE, [9, *range(9)])
    world.run_and_check(backend, batch, hq)
    assert segment_rows(batch) == [([0, 1, 2, 9], 100), ([3, 4, 5, 6, 7, 8], 300), ([7, 8], 300)]
    assert all((s.in_place is None) == scatter for s in batch.attn_metadata.segments)


@pytest.mark.parametrize("second_run", [300, 40])
def test_segment_over_two_slot_runs(second_run):
    """A shared prefix stored in two runs of consecutive slots: each long run is read in place
    as a segment of its own; with a short run, the whole prefix is gathered instead."""
    world = World(3)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=False)
    world.add_cached(0, 300)
    world.alloc.alloc(7)  # a gap: request 1's own tokens do not continue request 0's run
    world.add_cached(1, 300 + second_run + 5, share_from=0, shared=300)
    for row in (2, 3):
        world.add_cached(row, 300 + second_run + 9, share_from=1, shared=300 + second_run)
    batch = world.batch(ForwardMode.DECODE, [1, 2, 3])  # not request 0
    world.run_and_check(backend, batch, 6)
    assert segment_rows(batch) == [([1, 2, 3], 300 + second_run)]
    in_place = [s.in_place for s in batch.attn_metadata.segments]
    assert len(in_place) == (2 if second_run == 300 else 1)
    assert all((s is None) == (second_run == 40) for s in in_place)


@HEADS
def test_cascade_prefix_is_whole_context_but_one(heads):
    """Requests whose cached tokens are all shared: each one's suffix is its new token alone."""
    hq, hkv = heads
    world = World(hkv)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=False)
    world.add_cached(2, 150)
    for row in (0, 1, 3):
        world.add_cached(row, 150, share_from=2, shared=150)
    batch = world.batch(ForwardMode.DECODE, [0, 1, 2, 3])
    world.run_and_check(backend, batch, hq)
    assert segment_rows(batch) == [([0, 1, 2, 3], 150)]
    assert [b.length for b in batch.attn_metadata.buckets] == [1]
    world.run_and_check(backend, world.batch(ForwardMode.DECODE, [0, 1, 2, 3]), hq)


def test_short_common_header_is_folded_into_each_group():
    """A template header shorter than the threshold, shared by all, then two long groups: each
    group's segment starts at position 0."""
    world = World(1)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=False)
    world.add_cached(0, 12)
    world.add_cached(1, 400, share_from=0, shared=12)
    world.add_cached(2, 420, share_from=1, shared=300)
    world.add_cached(3, 380, share_from=0, shared=12)
    world.add_cached(4, 390, share_from=3, shared=290)
    batch = world.batch(ForwardMode.DECODE, [0, 1, 2, 3, 4])
    world.run_and_check(backend, batch, 3)
    assert segment_rows(batch) == [([1, 2], 300), ([3, 4], 290)]


@HEADS
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "cpu-kernel"])
def test_extend_then_decode_with_shared_prefixes(heads, kernel):
    """With the CPU kernel, extends of up to 128 tokens are attended by it (a query per token),
    longer ones by SDPA, both in one batch when they meet."""
    from radixflow.kernels import cpu_ext

    if kernel and not cpu_ext.available():
        pytest.skip("no C compiler for the CPU kernels")
    hq, hkv = heads
    world = World(hkv)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=kernel)
    world.add_cached(0, 0)
    world.run_and_check(backend, world.batch(ForwardMode.EXTEND, [0], [120]), hq)
    for row in (1, 2, 3):  # radix hits on request 0's prompt, then their own tokens
        world.add_cached(row, 100, share_from=0, shared=100)
    batch = world.batch(ForwardMode.EXTEND, [1, 2, 3], [7, 30, 1])
    world.run_and_check(backend, batch, hq)
    assert (batch.attn_metadata.kernel is not None) == kernel
    assert len(batch.attn_metadata.sdpa) == (0 if kernel else 3)
    for _ in range(2):
        batch = world.batch(ForwardMode.DECODE, [0, 1, 2, 3])
        world.run_and_check(backend, batch, hq)
        assert segment_rows(batch) == [([0, 1, 2, 3], 100)]
    # A chunked-prefill continuation next to a decode-like request, in one EXTEND batch.
    world.run_and_check(backend, world.batch(ForwardMode.EXTEND, [2, 3], [20, 1]), hq)
    # A long prompt (SDPA) ahead of short extends (the kernel, its queries not first in the batch).
    world.add_cached(4, 0)
    world.add_cached(5, 60, share_from=0, shared=50)
    batch = world.batch(ForwardMode.EXTEND, [4, 1, 5], [150, 3, 9])
    world.run_and_check(backend, batch, hq)
    meta = batch.attn_metadata
    assert [e for _, e, _, _ in meta.sdpa] == ([150] if kernel else [150, 3, 9])
    if kernel:
        assert meta.kernel[0].tolist() == list(range(150, 162))


def test_shared_prefix_segments_never_reach_the_last_key():
    idx = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 8]])
    segs, starts = shared_prefix_segments(idx, [4, 4, 3], min_prefix=1, call_cost=0)
    assert sorted((sorted(r), a, b) for r, a, b in segs) == [([0, 1], 2, 3), ([0, 1, 2], 0, 2)]
    assert starts == [3, 3, 2]
    segs, starts = shared_prefix_segments(idx, [4, 4, 3], min_prefix=2, call_cost=0)
    assert [(sorted(r), a, b) for r, a, b in segs] == [([0, 1, 2], 0, 2)] and starts == [2, 2, 2]


def test_pad_buckets_is_optimal_for_its_cost():
    buckets, cost = pad_buckets([10, 300, 12, 11], call_cost=50)
    assert sorted(map(sorted, buckets)) == [[0, 2, 3], [1]] and cost == 300 + 3 * 12 + 2 * 50
    buckets, cost = pad_buckets([10, 300, 12, 11], call_cost=1000)
    assert buckets == [[1, 2, 3, 0]] and cost == 4 * 300 + 1000


def benchmark(groups: int = 4, per_group: int = 16, prefix: int = 800, suffix: int = 60, hq: int = 9,
              hkv: int = 3, head_dim: int = 64, layers: int = 6, slots: int = 40000, reps: int = 5) -> None:
    """Per-layer decode time, plain padded SDPA vs cascade, on a shared-prefix batch laid out as
    in the engine: each group's prefix in consecutive slots (one prefill), the rest scattered
    over a pool larger than the caches, layers visited in turn."""
    b = groups * per_group
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(slots, layers, hkv, head_dim, torch.float32)
    for layer in range(layers):
        pool.k_buffer[layer].normal_(generator=gen)
        pool.v_buffer[layer].normal_(generator=gen)
    r2t = ReqToTokenPool(b, prefix + suffix + 2)
    scattered = groups * prefix + 1 + torch.randperm(slots - groups * prefix, generator=gen)
    for row in range(b):
        g = row // per_group
        r2t.write(row, 0, torch.arange(g * prefix + 1, (g + 1) * prefix + 1))
        r2t.write(row, prefix, scattered[row * (suffix + 1):(row + 1) * (suffix + 1)])
    batch = ForwardBatch.build(ForwardMode.DECODE, [0] * b, list(range(b)), [prefix + suffix] * b, [1] * b,
                               r2t.req_to_token[:, prefix + suffix].long(), "cpu")
    q = torch.randn(b, hq, head_dim, generator=gen)
    outs = {}
    for name, min_prefix in [("plain", 1 << 30), ("cascade", 64)]:
        backend = TorchAttnBackend(pool, r2t, min_shared_prefix=min_prefix, use_cpu_kernel=False)
        plans = []
        for _ in range(3):
            t0 = time.perf_counter()
            backend.init_forward_metadata(batch)
            plans.append(time.perf_counter() - t0)
        plan = min(plans)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for layer in range(layers):
                outs[name] = backend.forward_decode(q, layer, batch, head_dim ** -0.5)
            times.append((time.perf_counter() - t0) / layers)
        print(f"{name:8s} B={b} ctx={prefix + suffix + 1}: plan {plan * 1e3:.2f} ms/step, "
              f"decode {min(times) * 1e3:.2f} ms/layer (median {sorted(times)[reps // 2] * 1e3:.2f})")
    print("max |plain - cascade| =", (outs["plain"] - outs["cascade"]).abs().max().item())


if __name__ == "__main__":
    benchmark()


@HEADS
@DTYPES
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "cpu-kernel"])
def test_mixed_batch_prefill_and_decode_tail(heads, dtype, kernel):
    """An EXTEND batch whose last requests decode (the scheduler's mixed step): the prefills go
    through the extend path, the tail through the decode plan (buckets, cascade or the kernel)."""
    from radixflow.kernels import cpu_ext

    if kernel and (dtype not in (torch.float32, torch.float16, torch.bfloat16) or not cpu_ext.available()):
        pytest.skip("the CPU kernel serves fp32, fp16 and bf16 pools")
    hq, hkv = heads
    world = World(hkv, dtype)
    backend = TorchAttnBackend(world.kv_pool, world.r2t, use_cpu_kernel=kernel)
    world.add_cached(0, 0)
    world.add_cached(1, 40)
    world.add_cached(2, 330)
    for row in (3, 4, 5):
        world.add_cached(row, 300 + row, share_from=2, shared=300)
    world.add_cached(6, 9)
    for tail in ([1, 2, 6], [3, 4, 5, 6]):  # no sharing; a shared 300-token prefix (cascade)
        batch = world.batch(ForwardMode.EXTEND, [0, *tail], [17] + [1] * len(tail), num_decode=len(tail))
        world.run_and_check(backend, batch, hq)
        meta = batch.attn_metadata
        assert len(meta.sdpa) == (0 if kernel else 1) and meta.decode is not None
        assert (meta.kernel is not None) == kernel
        assert bool(meta.decode.segments) == (tail != [1, 2, 6])
        assert meta.decode.in_place == (kernel and tail == [1, 2, 6])
