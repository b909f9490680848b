"""The default model on its own quantized GGUF blocks: no fp32 copy of any weight, greedy text,
and teacher-forced accuracy against the fp32 (dequantized) path on a fixed English text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from radixflow.kernels import cpu_quant
from radixflow.runtime.engine import Engine
from radixflow.runtime.model.llama import Linear

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")

TEXT = Path(__file__).with_name("data") / "english_2000.txt"
N_TOKENS = 2000


@pytest.fixture(scope="module")
def qengine(default_model_path):
    eng = Engine(default_model_path, max_total_tokens=4096, max_running_requests=4)
    yield eng
    eng.shutdown()


def test_default_model_runs_quantized_without_fp32_weights(qengine):
    runner = qengine.scheduler.runner
    assert runner.quantization == "gguf"
    model = runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m._qw is not None for m in linears)
    assert model.embed_tokens.weight is None and model._embed_qw is not None and model.lm_head is None
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    q_bytes = sum(m._qw.nbytes for m in linears) + model._embed_qw.nbytes
    assert fp_bytes < 1_000_000  # the norms only
    assert 80e6 < q_bytes < 130e6  # 4.5-6 bits per weight, not 32
    kinds = {m._qw.kind for m in linears}
    assert kinds == {4} and model._embed_qw.kind == 8  # Q4_1 layers, Q8_0 embedding


def test_quantized_greedy_text(qengine):
    """Greedy output of the Q4_1 model (the fp32 path says the same words here)."""
    out = qengine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
    assert out["text"].startswith(" Paris.")
    outs = qengine.generate(["1, 2, 3, 4,", "The capital of France is"],
                            {"temperature": 0, "max_new_tokens": 8})
    assert outs[0]["text"].startswith(" 5, 6, 7")
    assert outs[1]["text"] == out["text"]


def _teacher_forced(path: str, ids: list[int], **kwargs) -> tuple[list[int], list[float]]:
    """(top-1 prediction, logprob of the true next token) at every position of `ids`."""
    with Engine(path, max_total_tokens=4096, max_running_requests=2, **kwargs) as eng:
        res = eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 1},
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
    meta = res["meta_info"]
    top = [t[0][1] for t in meta["input_top_logprobs"][1:]]
    lps = [t[0] for t in meta["input_token_logprobs"][1:]]
    return top, lps


def test_teacher_forced_accuracy_against_the_fp32_path(default_model_path, tokenizer, monkeypatch):
    """Item 7 of issue 18, on the integer path (16-bit activations, the lossy one; forced for every
    row count): top-1 agreement >= 99% and perplexity within 1% of the fp32-dequantized path."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:N_TOKENS]
    assert len(ids) == N_TOKENS
    ref_top, ref_lp = _teacher_forced(default_model_path, ids, quantization="none")
    monkeypatch.setattr(cpu_quant, "INT_MAX_M", 1 << 30)
    q_top, q_lp = _teacher_forced(default_model_path, ids, quantization="gguf")
    agree = sum(a == b for a, b in zip(ref_top, q_top)) / len(ref_top)
    ppl_ref, ppl_q = (math.exp(-sum(lp) / len(lp)) for lp in (ref_lp, q_lp))
    print(f"top-1 agreement {agree:.4f}, perplexity fp32 {ppl_ref:.4f} quantized {ppl_q:.4f}")
    assert agree >= 0.99
    assert abs(ppl_q / ppl_ref - 1) <= 0.01
    assert torch.tensor(ref_lp).isfinite().all()


def test_fp16_kv_is_the_cpu_default(qengine):
    pool = qengine.scheduler.runner.kv_pool
    assert pool.dtype == torch.float16
    assert qengine.scheduler.runner.attn_backend.use_cpu_kernel  # read in place by the C kernel


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fp_checkpoint_quantized_at_load(default_model_path, scheme):
    """quantization='int8' / 'int4' on the fp32 safetensors: every matmul weight quantized, the
    model still answers."""
    with Engine(default_model_path, quantization=scheme, max_total_tokens=256, max_running_requests=2) as eng:
        model = eng.scheduler.runner.model
        kinds = {m._qw.kind for m in model.modules() if isinstance(m, Linear)}
        assert kinds == {8 if scheme == "int8" else 4} and model._embed_qw is not None
        out = eng.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 4})
    assert "Paris" in out["text"]


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache(default_model_path, tokenizer, kv):
    """kv_cache_dtype fp8: one byte per element, read in place by the C kernel; teacher-forced
    top-1 agreement with the fp16 cache on 240 tokens of English text (e4m3 keeps more mantissa)."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:240]
    ref_top, _ = _teacher_forced(default_model_path, ids)
    with Engine(default_model_path, kv_cache_dtype=kv, max_total_tokens=1024, max_running_requests=2) as eng:
        runner = eng.scheduler.runner
        assert runner.kv_pool.k_buffer[0].element_size() == 1 and runner.attn_backend.use_cpu_kernel
        out = eng.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 8})
    assert "Paris" in out["text"]
    top, _ = _teacher_forced(default_model_path, ids, kv_cache_dtype=kv)
    agree = sum(a == b for a, b in zip(ref_top, top)) / len(top)
    print(f"{kv}: top-1 agreement with the fp16 cache {agree:.3f}")
    assert agree >= (0.97 if kv == "fp8_e4m3" else 0.9), agree
