"""The CPU matmul paths (OpenBLAS, the packed-weight C kernel) compute what F.linear computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixflow.kernels import cpu_ext
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.model.cpu_gemm import numpy_view_t, openblas_linear, probe


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_openblas_linear_equals_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 40, generator=g)
    got = openblas_linear(x, numpy_view_t(w), b)
    assert got.shape == (rows, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_openblas_linear_keeps_leading_dims_and_takes_strided_input():
    w = torch.randn(32, 16)
    x = torch.randn(3, 5, 32)[..., ::2]  # (3, 5, 16), not contiguous
    got = openblas_linear(x, numpy_view_t(w))
    assert got.shape == (3, 5, 32)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_only_contiguous_fp32_cpu_weights_qualify():
    assert numpy_view_t(torch.randn(8, 4)) is not None
    assert numpy_view_t(torch.randn(8, 4, dtype=torch.bfloat16)) is None
    assert numpy_view_t(torch.randn(4, 8).t()) is None
    assert probe(torch.randn(8, 4, dtype=torch.bfloat16)) == "torch"
    assert probe(torch.randn(256, 128), rows=(1, 4), reps=2) in ("torch", "openblas")


def test_config_rejects_unknown_gemm_backend():
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        EngineConfig(cpu_gemm="mkl")


needs_ext = pytest.mark.skipif(not cpu_ext.available(), reason="no C compiler for the CPU kernels")


@needs_ext
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("out_features", [16, 40, 97])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows, out_features, bias):
    """Every row-tile height (1-6 and remainders) and a last panel that is full, partial or one column."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, 37, generator=g)  # odd K: the two-accumulator loop's tail runs
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, 37, generator=g)
    packed = cpu_ext.pack_weight(w)
    assert packed.numel() == -(-out_features // 16) * 16 * 37
    got = cpu_ext.linear_packed(x, packed, out_features, b)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_ext
def test_packed_linear_keeps_leading_dims_and_takes_strided_input():
    w = torch.randn(24, 16)
    packed = cpu_ext.pack_weight(w)
    x = torch.randn(3, 5, 32)[..., ::2]  # (3, 5, 16), not contiguous
    torch.testing.assert_close(cpu_ext.linear_packed(x, packed, 24), F.linear(x, w), rtol=1e-5, atol=1e-5)
    rows = torch.randn(10, 40)[::3, 4:20]  # rows strided, each row contiguous: read in place
    torch.testing.assert_close(cpu_ext.linear_packed(rows, packed, 24), F.linear(rows, w), rtol=1e-5, atol=1e-5)
    assert cpu_ext.linear_packed(torch.randn(0, 16), packed, 24).shape == (0, 24)


@needs_ext
def test_packed_linear_rejects_mismatches():
    packed = cpu_ext.pack_weight(torch.randn(24, 16))
    with pytest.raises(ValueError, match="does not fit in_features 8"):
        cpu_ext.linear_packed(torch.randn(2, 8), packed, 24)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_ext.linear_packed(torch.randn(2, 16), packed, 40)
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_ext.linear_packed(torch.randn(2, 16, dtype=torch.float64), packed, 24)
    with pytest.raises(ValueError, match="bias must be"):
        cpu_ext.linear_packed(torch.randn(2, 16), packed, 24, torch.randn(23))
    with pytest.raises(ValueError, match="weight must be a contiguous fp32"):
        cpu_ext.pack_weight(torch.randn(16, 24).t())
