"""Quantized CPU matmuls and embeddings (kernels/cpu_quant.py) against their PyTorch references,
on every instruction-set level this CPU has, and GGUF blocks kept quantized."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from radixflow.kernels import cpu_quant as cq
from radixflow.kernels.reference import qlinear_ref
from radixflow.runtime.loading.gguf import dequantize
from radixflow.runtime.loading.gguf_quant import gguf_blocks

pytestmark = pytest.mark.skipif(not cq.available(), reason="no C compiler for the CPU kernels")

LEVELS = cq.LEVELS[:cq.LEVELS.index(cq.supported_level()) + 1] if cq.available() else ()


@pytest.fixture(params=LEVELS)
def level(request):
    assert cq.set_level(request.param) == request.param
    yield request.param
    cq.set_level(None)


def _weight(kind: int, N: int, K: int, seed: int, mins: bool) -> cq.QuantBlocks:
    g = torch.Generator().manual_seed(seed)
    if kind == 4:
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int8)
    else:
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    d = torch.rand(N, K // 32, generator=g) * 0.1
    m = torch.randn(N, K // 32, generator=g) * 0.1 if mins else None
    return cq.QuantBlocks(kind, q, d, m)


@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 17, 40])  # 17 and more: quantized on the pool's threads
@pytest.mark.parametrize("K", [32, 96, 128])
def test_integer_path_matches_reference(level, kind, M, K):
    """The default path: activations quantized per block, exact integer dot products (to fp32
    rounding)."""
    blocks = _weight(kind, 37, K, seed=M * 7 + K, mins=kind == 4 or M % 2 == 0)
    qw = blocks.pack()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    bias = torch.randn(37)
    got = cq.linear(x, qw, bias)
    kept = cq.blocks_of(qw)  # the scales and mins as packed (fp16)
    assert torch.equal(kept.q, blocks.q)
    want = qlinear_ref(x, kept.q, kept.d, kept.m) + bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and close to the matmul on W's values: the activation quantization error only
    exact = F.linear(x, cq.dequantize(qw), bias)
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("kind", [4, 8])
@pytest.mark.parametrize("M", [8, 9, 17, 40])
def test_fp32_path_equals_dequantized_matmul(level, kind, M):
    """int_max_m <= M: fp32 tiles over panels of W dequantized on the fly; N = 37 leaves a partial panel."""
    blocks = _weight(kind, 37, 96, seed=M, mins=True)
    qw = blocks.pack()
    x = torch.randn(M, 96)
    torch.testing.assert_close(cq.linear(x, qw, int_max_m=0), F.linear(x, cq.dequantize(qw)), rtol=1e-5, atol=1e-4)


def test_levels_agree_and_strided_rows_are_read_in_place():
    qw = _weight(4, 64, 128, seed=1, mins=True).pack()
    x = torch.randn(10, 200)[::2, 7:135]  # (5, 128), rows strided
    outs = []
    for lvl in LEVELS:
        cq.set_level(lvl)
        outs.append(cq.linear(x, qw))
    cq.set_level(None)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], cq.linear(x.contiguous(), qw))
    assert cq.linear(torch.randn(2, 3, 128), qw).shape == (2, 3, 64)
    assert cq.linear(torch.randn(0, 128), qw).shape == (0, 64)


def test_embedding_rows_are_dequantized():
    for kind in (4, 8):
        qw = _weight(kind, 50, 64, seed=kind, mins=kind == 4).pack()
        ids = torch.tensor([[0, 49], [7, 7]])
        assert torch.equal(cq.embedding(qw, ids), cq.dequantize(qw)[ids])
        with pytest.raises(IndexError):
            cq.embedding(qw, torch.tensor([50]))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_at_load_round_trips_within_a_step(scheme):
    w = torch.randn(24, 64)
    qw = cq.quantize(w, scheme)
    step = cq.blocks_of(qw).d  # as kept: fp16, within 0.2% of the fp32 step
    exact = (w.view(24, 2, 32).abs().amax(-1) / 127 if scheme == "int8" else
             (w.view(24, 2, 32).amax(-1) - w.view(24, 2, 32).amin(-1)) / 15)
    assert torch.allclose(step, exact, rtol=2e-3, atol=0)
    err = (cq.dequantize(qw) - w).abs().view(24, 2, 32)
    assert bool((err <= step[..., None] / 2 + 1e-6).all())
    assert torch.equal(cq.blocks_of(qw).pack().qs, qw.qs)


def test_pack_rejects_out_of_range_quants():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        cq.pack(4, torch.full((2, 32), 16, dtype=torch.int8), torch.ones(2, 1), None)
    with pytest.raises(ValueError, match="K % 32"):
        cq.pack(8, torch.zeros(2, 40, dtype=torch.int8), torch.ones(2, 1), None)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q5_0, QT.Q5_1])
def test_gguf_blocks_keep_the_exact_values(qtype):
    """Blocks kept quantized hold the values ggml defines (our numpy dequantizer, itself tested
    against gguf's) and run through the kernels as F.linear on them."""
    w = np.random.default_rng(int(qtype)).standard_normal((16, 96)).astype(np.float32)
    raw = gguf_quantize(w, qtype)
    blocks = gguf_blocks(raw, qtype, (16, 96))
    qw = blocks.pack()
    want = torch.from_numpy(dequantize(raw, qtype, (16, 96)))
    assert torch.equal(cq.dequantize(qw), want)
    x = torch.randn(12, 96)
    torch.testing.assert_close(cq.linear(x, qw, int_max_m=0), F.linear(x, want), rtol=1e-5, atol=1e-5)


def test_concat_promotes_four_bit_shards_exactly():
    a, b = _weight(4, 8, 64, seed=3, mins=True), _weight(8, 5, 64, seed=4, mins=False)
    both = cq.concat([a, b]).pack()
    assert both.kind == 8
    want = torch.cat([cq.dequantize(a.pack()), cq.dequantize(b.pack())])
    assert torch.equal(cq.dequantize(both), want)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K])
def test_k_quants_are_kept_as_blocks_of_32(qtype):
    """Q4_K / Q5_K super-blocks (random bytes with sane fp16 d and dmin; gguf-py cannot quantize
    K-quants) load as 4- / 8-bit blocks whose values are ggml's to the fp16 rounding of d * sc."""
    size = {QT.Q4_K: 144, QT.Q5_K: 176}[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (16 * 2, size), dtype=np.uint8)  # (16, 512): two super-blocks a row
    raw[:, 0:2] = np.full((32, 1), 0.01, np.float16).view(np.uint8)
    raw[:, 2:4] = np.full((32, 1), 0.002, np.float16).view(np.uint8)
    blocks = gguf_blocks(raw, qtype, (16, 512))
    assert blocks.kind == (4 if qtype == QT.Q4_K else 8)
    qw = blocks.pack()
    want = torch.from_numpy(gguf_dequantize(raw.reshape(-1), qtype).reshape(16, 512))
    torch.testing.assert_close(cq.dequantize(qw), want, rtol=0, atol=1e-3 * float(want.abs().max()))
    x = torch.randn(3, 512)
    torch.testing.assert_close(cq.linear(x, qw), F.linear(x, cq.dequantize(qw)), rtol=1e-2, atol=1e-2)
