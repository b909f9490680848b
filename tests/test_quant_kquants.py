"""GGUF K-quant files run on their own blocks: the default model re-encoded the way llama.cpp's
Q4_K_M mixes tensors (6-bit Q6_K ffn_down inside 4-bit layers; its attn_v and embedding have 576
columns, not a multiple of Q6_K's 256) loads with every Q6_K tensor kept as 6-bit quants with a
scale per 16 (kind 6), and predicts as its fp32-dequantized self does. Mixed kinds fused into one
layer are covered by test_quant.py's concat tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from radixflow.kernels import cpu_quant
from radixflow.runtime.engine import Engine
from radixflow.runtime.loading.default_model import convert_cached
from radixflow.runtime.loading.gguf import GGUF_FILE, dequantize
from radixflow.runtime.model.llama import Linear

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="no C compiler for the CPU kernels")

Q6_K_TENSORS = ("ffn_down.weight",)
TEXT = Path(__file__).with_name("data") / "english_2000.txt"


def q6_k_encode(w: np.ndarray) -> np.ndarray:
    """(N, K) fp32, K % 256 == 0 -> ggml's Q6_K bytes (N, K / 256 * 210): per 16 weights a scale
    amax / 31 stored as an int8 multiple of the super-block's fp16 d; q = round(x / (d sc)) + 32."""
    N, K = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)  # (super-blocks, sub-blocks, weights)
    s = np.abs(x).max(-1) / 31
    d = (s.max(-1) / 127).astype(np.float16)
    sc = np.clip(np.round(s / np.where(d > 0, d, 1).astype(np.float32)[:, None]), -128, 127).astype(np.int8)
    eff = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.round(x / np.where(eff > 0, eff, 1)[..., None]), -32, 31) * (eff > 0)[..., None]
    u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (n, half, c, l): weight 128 half + 32 c + l
    lo, hi = u & 0x0F, u >> 4
    ql = lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)  # c = 0, 1 in the low nibbles, 2, 3 in the high ones
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    n = u.shape[0]
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)],
                         axis=1)
    return out.reshape(N, K // 256 * 210)


def test_q6_k_encoder_matches_ggml():
    w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    raw = q6_k_encode(w)
    back = gguf_dequantize(raw.reshape(-1), QT.Q6_K).reshape(4, 512)
    assert np.abs(back - w).max() < 0.05 * np.abs(w).max()


def _copy_fields(reader: GGUFReader, writer: GGUFWriter) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the container's own fields; the writer adds the architecture
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub)


@pytest.fixture(scope="module")
def k_quant_folder(default_model_path, tmp_path_factory) -> str:
    """The default model with Q6_K_TENSORS re-encoded as Q6_K from their stored values, converted."""
    src = GGUFReader(Path(default_model_path) / GGUF_FILE)
    path = tmp_path_factory.mktemp("kquant") / "smollm2-q6k-mix.gguf"
    writer = GGUFWriter(str(path), "llama")
    _copy_fields(src, writer)
    for t in src.tensors:
        qtype = QT(t.tensor_type)
        if t.name.endswith(Q6_K_TENSORS):
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            writer.add_tensor(t.name, q6_k_encode(dequantize(t.data, qtype, shape)), raw_dtype=QT.Q6_K)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=None if qtype == QT.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return convert_cached(path, path.with_suffix(""))


def _run(path: str, ids: list[int], **kwargs) -> tuple[list[int], str]:
    """(teacher-forced top-1 prediction at every position of `ids`, greedy text of a prompt)."""
    with Engine(path, max_total_tokens=2048, max_running_requests=2, **kwargs) as eng:
        if kwargs.get("quantization") == "gguf":
            _check_kinds(eng.scheduler.runner.model)
        res = eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 1},
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
        text = eng.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 6})["text"]
    return [t[0][1] for t in res["meta_info"]["input_top_logprobs"][1:]], text


def _check_kinds(model: torch.nn.Module) -> None:
    kinds: dict[str, set[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(m._qw.kind)
    assert kinds == {"qkv_proj": {4}, "o_proj": {4}, "gate_up_proj": {4}, "down_proj": {6}}
    assert model._embed_qw.kind == 8  # Q8_0, as stored


def test_mixed_k_quant_file_runs_on_its_own_blocks(k_quant_folder, tokenizer):
    """Top-1 agreement of the kept blocks with the fp32 values of the same file, teacher-forced
    (the integer path's 16-bit activations are the only loss)."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:400]
    ref, ref_text = _run(k_quant_folder, ids, quantization="none")
    got, text = _run(k_quant_folder, ids, quantization="gguf")
    agree = sum(a == b for a, b in zip(ref, got)) / len(ref)
    print(f"top-1 agreement {agree:.4f} over {len(ref)} tokens; greedy {text!r} (fp32 {ref_text!r})")
    assert agree >= 0.99
    assert text == ref_text and text.startswith(" Paris")  # decoding (the fused step) on kind 6 too
