"""TritonAttnBackend on hand-built pools and batches vs dense attention in PyTorch.

Without CUDA the kernels run under the Triton interpreter (tiny shapes); with CUDA, compiled.
Tolerance: float32 1e-4 (2e-2 on CUDA: TF32 dots), float16 1e-2.
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of a radixflow kernel module (the interpreter is chosen then).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from radixflow.kernels._utils import is_interpreted  # noqa: E402
from radixflow.kernels.extend_attention import _extend_attention_kernel  # noqa: E402
from radixflow.runtime.model.attention.triton_backend import TritonAttnBackend  # noqa: E402
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from radixflow.runtime.model.memory_pool import KVPool, ReqToTokenPool, TokenAllocator  # noqa: E402

if not CUDA and not is_interpreted(_extend_attention_kernel):
    pytest.skip("radixflow.kernels was imported before TRITON_INTERPRET=1 was set (by another test "
                "module) and there is no GPU: run this file alone to test the backend on CPU",
                allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
LAYERS, HEAD_DIM = 2, 16


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """q (E, Hq, D) at positions prefix.., k/v (prefix + E, Hkv, D) -> (E, Hq * D), float32."""
    group = q.shape[1] // k.shape[1]
    e, s = q.shape[0], k.shape[0]
    mask = torch.arange(s, device=q.device)[None, :] <= prefix + torch.arange(e, device=q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(group, 1).transpose(0, 1),
        v.float().repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask, scale=HEAD_DIM ** -0.5)
    return out.transpose(0, 1).reshape(e, -1)


class World:
    """Pools, an allocator and each request's full K/V history per layer (the ground truth)."""

    def __init__(self, kv_heads: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.kv_pool = KVPool(256, LAYERS, kv_heads, HEAD_DIM, dtype, DEVICE)
        self.r2t = ReqToTokenPool(6, 128, DEVICE)
        self.alloc = TokenAllocator(256)
        self.hist: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.gen = torch.Generator().manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(DEVICE, self.dtype)

    def add_cached_prefix(self, row: int, n: int) -> None:
        """Pretend `n` tokens of `row` are already cached (e.g. matched in the radix tree)."""
        slots = self.alloc.alloc(n)
        self.r2t.write(row, 0, slots)
        hkv = self.kv_pool.kv_heads
        self.hist[row] = []
        for layer in range(LAYERS):
            k, v = self.randn(n, hkv, HEAD_DIM), self.randn(n, hkv, HEAD_DIM)
            self.kv_pool.k_buffer[layer][slots.to(DEVICE)] = k
            self.kv_pool.v_buffer[layer][slots.to(DEVICE)] = v
            self.hist[row].append((k, v))

    def batch(self, mode: ForwardMode, rows: list[int], extend_lens: list[int]) -> ForwardBatch:
        prefix_lens = [self.hist[r][0][0].shape[0] for r in rows]
        loc = self.alloc.alloc(sum(extend_lens))
        off = 0
        for row, p, e in zip(rows, prefix_lens, extend_lens, strict=True):
            self.r2t.write(row, p, loc[off:off + e])  # the caller's job before the forward
            off += e
        return ForwardBatch.build(mode, [0] * sum(extend_lens), rows, prefix_lens, extend_lens, loc, DEVICE)

    def run_and_check(self, backend: TritonAttnBackend, batch: ForwardBatch, hq: int) -> None:
        backend.init_forward_metadata(batch)
        hkv, T = self.kv_pool.kv_heads, batch.num_tokens
        for layer in range(LAYERS):
            q, k, v = self.randn(T, hq, HEAD_DIM), self.randn(T, hkv, HEAD_DIM), self.randn(T, hkv, HEAD_DIM)
            out = backend.forward(q, k, v, layer, batch, HEAD_DIM ** -0.5)
            assert out.shape == (T, hq * HEAD_DIM) and out.dtype == self.dtype
            assert torch.equal(self.kv_pool.k_buffer[layer][batch.out_cache_loc], k)
            assert torch.equal(self.kv_pool.v_buffer[layer][batch.out_cache_loc], v)
            start = 0
            for i, row in enumerate(batch.req_pool_indices.tolist()):
                e, p = batch.extend_lens_cpu[i], batch.prefix_lens_cpu[i]
                old_k, old_v = self.hist[row][layer]
                new_k = torch.cat([old_k, k[start:start + e]])
                new_v = torch.cat([old_v, v[start:start + e]])
                self.hist[row][layer] = (new_k, new_v)
                ref = dense_attention(q[start:start + e], new_k, new_v, p)
                t = (2e-2 if CUDA else 1e-4) if self.dtype == torch.float32 else 1e-2
                torch.testing.assert_close(out[start:start + e].float(), ref, atol=t, rtol=t)
                start += e


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_with_mixed_prefixes_then_decode(heads, dtype):
    hq, hkv = heads
    world = World(hkv, dtype)
    backend = TritonAttnBackend(world.kv_pool, world.r2t)
    rows = [3, 0, 5]
    for row, prefix in zip(rows, [0, 5, 21], strict=True):
        world.add_cached_prefix(row, prefix)
    world.run_and_check(backend, world.batch(ForwardMode.EXTEND, rows, [7, 3, 18]), hq)
    for _ in range(2):
        world.run_and_check(backend, world.batch(ForwardMode.DECODE, rows, [1, 1, 1]), hq)
    # A chunked-prefill continuation next to a decode-like request, in one EXTEND batch.
    world.run_and_check(backend, world.batch(ForwardMode.EXTEND, [5, 3], [20, 1]), hq)


def test_forward_requires_metadata():
    world = World(1, torch.float32)
    backend = TritonAttnBackend(world.kv_pool, world.r2t)
    world.add_cached_prefix(0, 0)
    batch = world.batch(ForwardMode.EXTEND, [0], [2])
    x = torch.zeros(2, 1, HEAD_DIM, device=DEVICE)
    with pytest.raises(AssertionError, match="init_forward_metadata"):
        backend.forward(x, x, x, 0, batch, 1.0)
