"""A GGUF's weights as they are stored: quantized blocks kept quantized, for radixflow's kernels.

`gguf_blocks` maps the raw bytes of one tensor to `cpu_quant.QuantBlocks` (per-element quants
with per-block scales and mins, no fp32 values): Q4_0 and Q4_1 become 4-bit blocks, Q8_0, Q5_0
and Q5_1 8-bit ones, each value exactly as ggml defines it. Other block types (K-quants,
IQ-quants) are decoded to fp32 and requantized to 8-bit blocks of 32. `iter_gguf_weights`
yields every tensor of a Llama GGUF under its Hugging Face name, in HF Q/K row order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

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
    if qtype not in _LAYOUTS:  # K-quants and others: requantized (lossy) to 8-bit blocks
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
