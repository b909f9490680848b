"""Write the new tokens' K and V into the per-layer KV pool.

Reference: `radixflow.kernels.reference.store_kv_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixflow.kernels._utils import check_launch, next_pow2
from radixflow.kernels.reference import store_kv_ref

__all__ = ["store_kv", "store_kv_ref"]


@triton.jit
def _store_kv_kernel(K, V, K_Buf, V_Buf, Loc, stride_kt, stride_vt, stride_kbs, stride_vbs,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    # One program: token t; a token's heads are ROW = Hkv * D contiguous elements everywhere.
    t = tl.program_id(0)
    slot = tl.load(Loc + t).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(K + t.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(V + t.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(K_Buf + slot * stride_kbs + offs, k.to(K_Buf.dtype.element_ty), mask=mask)
    tl.store(V_Buf + slot * stride_vbs + offs, v.to(V_Buf.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
             loc: torch.Tensor) -> None:
    """In place: k_buffer[loc[t]] = k[t], v_buffer[loc[t]] = v[t], cast to the buffer dtype.

    k, v (T, Hkv, D), any token stride but each token's (Hkv, D) block contiguous (e.g. a
    column slice of a fused qkv projection); k_buffer/v_buffer (num_slots + 1, Hkv, D) with
    contiguous rows; loc (T,) integer slot indices. Slots must be distinct (duplicates leave
    an unspecified one of the writes).
    """
    T, Hkv, D = k.shape  # (tokens, kv heads, head_dim)
    assert v.shape == (T, Hkv, D) and loc.shape == (T,) and not loc.is_floating_point()
    assert k_buffer.shape[1:] == v_buffer.shape[1:] == (Hkv, D), (k_buffer.shape, v_buffer.shape)
    for t in (k, v, k_buffer, v_buffer):
        assert t.stride(2) == 1 and t.stride(1) == D, \
            f"each token's (heads, head_dim) must be contiguous, got strides {t.stride()}"
    check_launch(_store_kv_kernel, k, v, k_buffer, v_buffer, loc)
    if T == 0:
        return
    row = Hkv * D
    block = min(next_pow2(row), 4096)
    _store_kv_kernel[(T, triton.cdiv(row, block))](
        k, v, k_buffer, v_buffer, loc, k.stride(0), v.stride(0), k_buffer.stride(0),
        v_buffer.stride(0), ROW=row, BLOCK=block)
