"""Quantized CPU matmuls and embeddings (kernels/cpu_quant.py) against their PyTorch references,
on every instruction-set level this CPU has, and GGUF blocks kept quantized."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

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


_RANGES = {4: (0, 15), 6: (-32, 31), 8: (-127, 127)}


def _weight(kind: int, N: int, K: int, seed: int, mins: bool) -> cq.QuantBlocks:
    g = torch.Generator().manual_seed(seed)
    lo, hi = _RANGES[kind]
    q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
    gs = cq.scale_group(kind)
    d = torch.rand(N, K // gs, generator=g) * 0.1
    m = torch.randn(N, K // gs, generator=g) * 0.1 if mins else None
    return cq.QuantBlocks(kind, q, d, m)


@pytest.mark.parametrize("kind", [4, 6, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 17, 40, 200])  # 17+: quantized by the pool; 200: rows split
@pytest.mark.parametrize("K", [32, 96, 128])
def test_integer_path_matches_reference(level, kind, M, K):
    """The default path: activations quantized per block, exact integer dot products (to fp32
    rounding)."""
    blocks = _weight(kind, 37, K, seed=M * 7 + K, mins=kind != 8 or M % 2 == 0)
    qw = blocks.pack()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    bias = torch.randn(37)
    got = cq.linear(x, qw, bias, int_max_m=1 << 30)
    kept = cq.blocks_of(qw)  # the scales and mins as packed (fp16)
    assert torch.equal(kept.q, blocks.q)
    want = qlinear_ref(x, kept.q, kept.d, kept.m) + bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and close to the matmul on W's values: the activation quantization error only
    exact = F.linear(x, cq.dequantize(qw), bias)
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.parametrize("kind", [4, 6, 8])
@pytest.mark.parametrize("M", [8, 9, 17, 40])
def test_fp32_path_equals_dequantized_matmul(level, kind, M):
    """int_max_m <= M: fp32 tiles over panels of W dequantized on the fly; N = 37 leaves a partial panel."""
    blocks = _weight(kind, 37, 96, seed=M, mins=True)
    qw = blocks.pack()
    x = torch.randn(M, 96)
    torch.testing.assert_close(cq.linear(x, qw, int_max_m=0), F.linear(x, cq.dequantize(qw)), rtol=1e-5, atol=1e-4)


def test_default_crossover_of_each_level(level):
    """INT_MAX_M = -1: the integer path at every M on AVX-512 VNNI, below 128 rows elsewhere (on
    AVX2 the fp32 panels are faster from there on)."""
    qw = _weight(4, 37, 64, seed=9, mins=True).pack()
    x = torch.randn(130, 64)
    ints, panels = cq.linear(x, qw, int_max_m=1 << 30), cq.linear(x, qw, int_max_m=0)
    assert torch.equal(cq.linear(x, qw), ints if level == "avx512" else panels)
    assert torch.equal(cq.linear(x[:127], qw), ints[:127])


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
    for kind in (4, 6, 8):
        qw = _weight(kind, 50, 64, seed=kind, mins=kind != 8).pack()
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


@pytest.mark.parametrize("kinds, fused", [((4, 8), 8), ((4, 6), 6), ((6, 4, 6), 6), ((6, 8), 6)])
def test_concat_keeps_every_shard_exactly(kinds, fused):
    """Fused q/k/v or gate/up shards of different kinds (a Q4_K_M file mixes Q4_K and Q6_K) join
    in the smallest kind holding all: a 4-bit shard in 8-bit blocks, 4- and 5-bit shards in
    kind 6 with their scales repeated per half, each value unchanged."""
    parts = []
    for i, kind in enumerate(kinds):
        w = _weight(kind, 8 + i, 64, seed=3 + i, mins=kind == 4)
        if kind == 8 and fused == 6:  # 8-bit quants that fit 6 bits: Q5_0 / Q5_1 / Q5_K
            w = cq.QuantBlocks(8, w.q.clamp(-16, 15), w.d, w.m)
        parts.append(w)
    both = cq.concat(parts).pack()
    assert both.kind == fused
    want = torch.cat([cq.dequantize(p.pack()) for p in parts])
    assert torch.equal(cq.dequantize(both), want)
    x = torch.randn(3, 64)
    torch.testing.assert_close(cq.linear(x, both), F.linear(x, want), rtol=1e-3, atol=1e-3)


def test_concat_requantizes_six_bit_shards_joining_wide_int8():
    """The one lossy case: 6-bit quants with per-16 scales cannot join int8 quants beyond
    [-32, 31] (Q8_0): they are requantized to int8 blocks, within half a step."""
    six, wide = _weight(6, 8, 64, seed=5, mins=False), _weight(8, 5, 64, seed=6, mins=False)
    both = cq.concat([six, wide]).pack()
    assert both.kind == 8
    w6 = cq.dequantize(six.pack())
    got = cq.dequantize(both)
    assert torch.equal(got[8:], cq.dequantize(wide.pack()))
    step = w6.view(8, 2, 32).abs().amax(-1) / 127
    assert bool(((got[:8] - w6).abs().view(8, 2, 32) <= step[..., None] * 0.51 + 1e-6).all())


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_k_quants_are_kept_as_blocks(qtype):
    """Q4_K / Q5_K / Q6_K super-blocks (random bytes with sane fp16 d and dmin; gguf-py cannot
    quantize K-quants) load as 4- / 8- / 6-bit blocks whose quants are ggml's exactly, and whose
    values are ggml's to the fp16 rounding of d * sc."""
    size, kind = {QT.Q4_K: (144, 4), QT.Q5_K: (176, 8), QT.Q6_K: (210, 6)}[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (16 * 2, size), dtype=np.uint8)  # (16, 512): two super-blocks a row
    d_at = 208 if qtype == QT.Q6_K else 0  # Q6_K: d last, int8 scales, no dmin
    raw[:, d_at:d_at + 2] = np.full((32, 1), 0.01 if kind != 6 else 0.001, np.float16).view(np.uint8)
    if kind != 6:
        raw[:, 2:4] = np.full((32, 1), 0.002, np.float16).view(np.uint8)
    blocks = gguf_blocks(raw, qtype, (16, 512))
    assert blocks.kind == kind
    want = torch.from_numpy(gguf_dequantize(raw.reshape(-1), qtype).reshape(16, 512))
    gs = cq.scale_group(kind)
    exact = blocks.q.float().view(16, -1, gs) * blocks.d[..., None]
    if blocks.m is not None:
        exact += blocks.m[..., None]
    assert torch.equal(exact.view(16, 512), want)  # fp32 scales: ggml's values to the bit
    qw = blocks.pack()
    assert qw.kind == kind and torch.equal(cq.unpack(qw), blocks.q)
    torch.testing.assert_close(cq.dequantize(qw), want, rtol=0, atol=1e-3 * float(want.abs().max()))
    x = torch.randn(3, 512)
    torch.testing.assert_close(cq.linear(x, qw), F.linear(x, cq.dequantize(qw)), rtol=1e-2, atol=1e-2)


def _simde_include() -> str | None:
    """A folder holding SIMD Everywhere's headers (simde/x86/avx512.h) recent enough to emulate
    every AVX-512 intrinsic cpu_qmm.c uses (0.8+), from RADIXFLOW_SIMDE_INCLUDE or /usr/include."""
    for root in (os.environ.get("RADIXFLOW_SIMDE_INCLUDE"), "/usr/include"):
        cvt = Path(root or "/nonexistent") / "simde" / "x86" / "avx512" / "cvt.h"
        if cvt.is_file() and "simde_mm512_cvtph_ps" in cvt.read_text():
            return root
    return None


_EMULATED = """
#define _IMMINTRIN_H_INCLUDED /* GCC's own intrinsics out: simde's portable ones in */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>
#define _cvtsh_ss(h) qt_half_to_float(h)
#include "cpu_qmm.c"
"""


@pytest.mark.skipif(_simde_include() is None, reason="no SIMD Everywhere 0.8+ headers (RADIXFLOW_SIMDE_INCLUDE)")
def test_avx512_path_under_emulation(tmp_path):
    """cpu_qmm.c's AVX-512 + VNNI path, built on simde's portable emulation of the intrinsics,
    against the reference: the AVX-512 code checked on CPUs without AVX-512 (AMD AVX2 machines)."""
    src = tmp_path / "emulated.c"
    src.write_text(_EMULATED)
    so = tmp_path / "emulated.so"
    isa = [f"-D__{f}__" for f in ("AVX2", "FMA", "F16C", "AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "AVX512VNNI")]
    subprocess.run(["gcc", "-O1", "-fPIC", "-shared", "-std=gnu11", "-w", "-DSIMDE_NO_NATIVE", *isa,
                    "-DQM_SUFFIX=avx512", f"-I{_simde_include()}", f"-I{Path(cq.__file__).parent}", str(src),
                    "-o", str(so), "-lm"], check=True, timeout=600)
    fn = ctypes.CDLL(str(so)).qm_linear_avx512
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [i32, p, i64, i64, p, p, p, p, i64, i64, p, i64, i32, p, i32]
    for kind in (4, 6, 8):
        for M, int_max_m in ((1, 1 << 30), (5, 1 << 30), (9, 0)):
            qw = _weight(kind, 37, 128, seed=kind + M, mins=kind != 8).pack()
            x, bias, y = torch.randn(M, 128), torch.randn(37), torch.empty(M, 37)
            assert fn(kind, x.data_ptr(), 128, M, qw.qs.data_ptr(), qw.d.data_ptr(),
                      None if qw.m is None else qw.m.data_ptr(), bias.data_ptr(), 37, 128, y.data_ptr(), 37,
                      int_max_m, None, 1) == 0
            kept = cq.blocks_of(qw)
            want = (qlinear_ref(x, kept.q, kept.d, kept.m) if int_max_m else F.linear(x, cq.dequantize(qw))) + bias
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
