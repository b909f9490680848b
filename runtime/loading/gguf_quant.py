"""A GGUF's weights as they are stored: quantized blocks kept quantized, for radixflow's kernels.

`gguf_blocks` maps the raw bytes of one tensor to `cpu_quant.QuantBlocks` (per-element quants
with per-block scales and mins, no fp32 values): Q4_0 and Q4_1 become 4-bit blocks, Q8_0, Q5_0
and Q5_1 8-bit ones, each value exactly as ggml defines it. Q4_K and Q5_K (super-blocks of 256
with 6-bit scales per 32) become 4- and 8-bit blocks of 32 with scale d * sc and min -dmin * m,
and Q6_K (sub-blocks of 16, int8 scales) becomes kind-6 blocks (6-bit quants, a scale d * sc per
16); the kernels keep these products in fp16 (within 0.05% of ggml's fp32 ones). Other block
types (Q2_K, Q3_K, IQ-quants) are decoded to fp32 and requantized to 8-bit blocks.
`iter_gguf_weights` yields every tensor of a Llama GGUF under its Hugging Face name, in HF Q/K
row order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import Q4_K

from radixflow.kernels.cpu_quant import QuantBlocks, blocks_of, quantize
from radixflow.runtime.loading.gguf import _f16, _fifth_bits, _nibbles, dequantize, hf_tensor_name, unpermute_qk

logger = logging.getLogger(__name__)

# block type -> (bytes per block, kind, byte offset of the quants, has a min, quant offset)
_LAYOUTS = {QT.Q4_0: (18, 4, 2, False, -8), QT.Q4_1: (20, 4, 4, True, 0), QT.Q8_0: (34, 8, 2, False, 0),
            QT.Q5_0: (22, 8, 6, False, -16), QT.Q5_1: (24, 8, 8, True, 0)}


def gguf_blocks(raw: np.ndarray, qtype: QT, shape: tuple[int, int]) -> QuantBlocks | None:
    """The (N, K) tensor of `qtype` in raw bytes as QuantBlocks; None for F32/F16/BF16 (kept as
    floats). Raises ValueError if the sizes disagree."""
    if qtype in (QT.F32, QT.F16, QT.BF16):
        return None
    N, K = shape
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if qtype in (QT.Q4_K, QT.Q5_K):
        return _k_quant_blocks(data, qtype, shape)
    if qtype == QT.Q6_K:
        return _q6_k_blocks(data, shape)
    if qtype not in _LAYOUTS:  # other K-quants and IQ-quants: requantized (lossy) to 8-bit blocks
        return blocks_of(quantize(torch.from_numpy(dequantize(data, qtype, shape)), "int8"))
    size, kind, qoff, has_min, offset = _LAYOUTS[qtype]
    if data.size != N * K // 32 * size:
        raise ValueError(f"{qtype.name} tensor of shape {shape}: {data.size} bytes, expected {N * K // 32 * size}")
    b = data.reshape(-1, size)
    d = _f16(b, 0)
    m = _f16(b, 2) if has_min else None
    if qtype == QT.Q8_0:
        q = np.ascontiguousarray(b[:, 2:]).view(np.int8)
    elif qtype in (QT.Q5_0, QT.Q5_1):
        q = ((_nibbles(b[:, qoff:]) | (_fifth_bits(b[:, qoff - 4:qoff]) << np.uint8(4))).astype(np.int16)
             + offset).astype(np.int8)
    else:
        q = _nibbles(b[:, qoff:]).view(np.int8)
    if kind == 4 and offset:  # Q4_0: d * (q - 8) = d * q + (-8 d)
        m = d * np.float32(offset)
    nb = K // 32

    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    return QuantBlocks(kind, t(q.reshape(N, K)), t(d.reshape(N, nb)), t(None if m is None else m.reshape(N, nb)))


_K_SIZES = {QT.Q4_K: 144, QT.Q5_K: 176}  # bytes per super-block of 256


def _k_quant_blocks(data: np.ndarray, qtype: QT, shape: tuple[int, int]) -> QuantBlocks:
    """Q4_K / Q5_K (ggml-common.h: fp16 d and dmin, 12 bytes of 6-bit scales and mins for the
    eight sub-blocks of 32, [Q5_K: 32 bytes of fifth bits,] 128 bytes of nibbles) as blocks of 32:
    value = (d * sc) q - dmin * m."""
    N, K = shape
    size = _K_SIZES[qtype]
    if K % 256 or data.size != N * K // 256 * size:
        raise ValueError(f"{qtype.name} tensor of shape {shape}: {data.size} bytes, expected {N * K // 256 * size}")
    b = data.reshape(-1, size)
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    d = _f16(b, 0) * sc.astype(np.float32)  # (n, 8)
    m = -_f16(b, 2) * mn.astype(np.float32)
    qoff = 16 if qtype == QT.Q4_K else 48
    # 64-element chunks: low nibbles are sub-block 2c, high nibbles 2c + 1
    q = (b[:, qoff:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    q = q.reshape(-1, 8, 32)
    if qtype == QT.Q5_K:  # bit j of the fifth-bit bytes belongs to sub-block j
        bits = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q = q | (bits << np.uint8(4))
    kind, nb = (4 if qtype == QT.Q4_K else 8), K // 32
    return QuantBlocks(kind, torch.from_numpy(np.ascontiguousarray(q.reshape(N, K)).view(np.int8)),
                       torch.from_numpy(np.ascontiguousarray(d.reshape(N, nb))),
                       torch.from_numpy(np.ascontiguousarray(m.reshape(N, nb))))


def _q6_k_blocks(data: np.ndarray, shape: tuple[int, int]) -> QuantBlocks:
    """Q6_K (ggml-common.h: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, fp16
    d per super-block of 256) as kind-6 blocks: q in [-32, 31], scale d * sc per 16 weights."""
    N, K = shape
    if K % 256 or data.size != N * K // 256 * 210:
        raise ValueError(f"Q6_K tensor of shape {shape}: {data.size} bytes, expected {N * K // 256 * 210}")
    b = data.reshape(-1, 210)
    # per 128-weight half h: ql[64 h: 64 h + 64], qh[32 h: 32 h + 32]; weights 32 c + l (c < 4, l < 32)
    # take the low (c = 0, 1) or high (c = 2, 3) nibbles of ql[64 h + 32 (c % 2) + l], and bits
    # 2c, 2c + 1 of qh[32 h + l]
    ql = b[:, :128].reshape(-1, 2, 1, 2, 32)  # (n, h, nibble, c % 2, l)
    lo = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)) & np.uint8(0x0F)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # (n, h, 1, l)
    hi = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & np.uint8(3)  # (n, h, c, l)
    q = (lo.reshape(-1, 2, 4, 32) | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
    d = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    return QuantBlocks(6, torch.from_numpy(np.ascontiguousarray(q.reshape(N, K))),
                       torch.from_numpy(np.ascontiguousarray(d.reshape(N, K // 16))), None)


def _permute_rows(blocks: QuantBlocks, n_head: int) -> QuantBlocks:
    def p(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.from_numpy(np.ascontiguousarray(unpermute_qk(t.numpy(), n_head)))

    return QuantBlocks(blocks.kind, p(blocks.q), p(blocks.d), p(blocks.m))


def iter_gguf_weights(path: str | os.PathLike, heads: int, kv_heads: int,
                      quantized: bool = True) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
    """(HF name, weight) for every tensor of a Llama GGUF: 2-D block-quantized tensors as
    QuantBlocks when `quantized`, everything else fp32, in HF Q/K row order."""
    reader = GGUFReader(path)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        name = hf_tensor_name(t.name)
        n_head = heads if t.name.endswith(("attn_q.weight", "attn_q.bias")) else \
            kv_heads if t.name.endswith(("attn_k.weight", "attn_k.bias")) else 0
        qb = gguf_blocks(t.data, QT(t.tensor_type), shape) if quantized and len(shape) == 2 else None
        if qb is not None:
            yield name, _permute_rows(qb, n_head) if n_head else qb
            continue
        w = dequantize(t.data, QT(t.tensor_type), shape)
        yield name, torch.from_numpy(np.array(unpermute_qk(w, n_head) if n_head else w))  # a copy: not the mmap
