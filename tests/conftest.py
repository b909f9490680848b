"""Shared fixtures: the default model is converted once and loaded once per session."""

from __future__ import annotations

import os

import pytest

# As in users' programs that import radixflow first: it sets OMP_WAIT_POLICY before torch loads,
# which decides whether the CPU matmuls may run on OpenBLAS (runtime/cpu_gemm.py).
import radixflow  # noqa: F401

# Keep the two CI cores for the engine; tokenizers' own thread pool only competes with it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from radixflow.runtime.loading.default_model import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def fp32_model_path(default_model_path: str) -> str:
    """The default model's folder with its fp32 model.safetensors (written on first use): for
    transformers and the tests that read the weights."""
    from radixflow.runtime.loading.default_model import ensure_fp32_weights

    return ensure_fp32_weights(default_model_path)


@pytest.fixture(scope="session")
def engine(default_model_path: str):
    """One in-process Engine on the default model for the whole session: fp32 weights and KV
    (the path the Hugging Face parity tests compare; tests/test_quant_model.py runs the quantized one)."""
    from radixflow.runtime.engine import Engine

    eng = Engine(default_model_path, max_total_tokens=24576, max_running_requests=48,
                 quantization="none", kv_cache_dtype="float32",
                 chunked_prefill_size=512, max_prefill_tokens=2048)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tokenizer(default_model_path: str):
    from radixflow.runtime.text.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(default_model_path)
