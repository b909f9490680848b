"""The OpenBLAS matmul path computes what F.linear computes, for every shape the model uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixflow.runtime.config import EngineConfig
from radixflow.runtime.cpu_gemm import numpy_view_t, openblas_linear, probe


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
