"""Every Triton kernel against its PyTorch reference.

Without CUDA the kernels run under the Triton interpreter on tiny shapes; with CUDA the same
tests run compiled on the GPU at real sizes. Tolerances (max abs error, |out - ref| <= atol +
rtol * |ref|, reference in float32 from the same rounded inputs): float32 1e-4 (2e-2 on CUDA,
where float32 dots use TF32), float16 2e-3 (1e-2 on CUDA: probabilities are rounded to fp16
before the P @ V dot), bfloat16 2e-2. Elementwise kernels: float32 1e-5, 16-bit one ulp-ish.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of a radixflow kernel module (the interpreter is chosen then).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from radixflow.kernels._utils import is_interpreted  # noqa: E402
from radixflow.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from radixflow.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from radixflow.kernels.extend_attention import (  # noqa: E402
    _extend_attention_kernel,
    extend_attention,
    extend_attention_ref,
)
from radixflow.kernels.rmsnorm import (  # noqa: E402
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_ref,
)
from radixflow.kernels.rotary import build_rope_cache, rotary, rotary_ref  # noqa: E402
from radixflow.kernels.store_kv import store_kv, store_kv_ref  # noqa: E402

if not CUDA and not is_interpreted(_extend_attention_kernel):
    pytest.skip("radixflow.kernels was imported before TRITON_INTERPRET=1 was set (by another test "
                "module) and there is no GPU: run this file alone to test the kernels on CPU",
                allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
# (prefix_len, extend_len) per request. CPU: tiny, crossing the interpreter's 16-token blocks.
COMPOSITIONS = {
    "prefix0": [(0, 7), (0, 20), (0, 1)],
    "ragged": [(5, 3), (37, 9), (16, 16), (1, 1)],
    "long_and_short": [(40, 30), (0, 1), (3, 1), (2, 2), (7, 1)],
}
if CUDA:
    COMPOSITIONS = {
        "prefix0": [(0, 700), (0, 2048), (0, 1), (0, 63)],
        "ragged": [(517, 33), (3700, 129), (1024, 1024), (1, 1), (64, 64)],
        "long_and_short": [(3000, 1500)] + [(p, 1 + p % 5) for p in range(0, 120, 7)],
    }


def tol(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float32:
        t = 2e-2 if CUDA else 1e-4
    elif dtype == torch.float16:
        t = 1e-2 if CUDA else 2e-3
    else:
        t = 2e-2
    return {"atol": t, "rtol": t}


def make_pool(compositions: list[tuple[int, int]], kv_heads: int, head_dim: int, dtype: torch.dtype,
              seed: int = 0):
    """Random KV pool and req_to_token rows (shuffled slots, rows out of order)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in compositions]
    total = sum(seq_lens)
    num_slots = total + 13
    k_buf = torch.randn(num_slots + 1, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_buf = torch.randn(num_slots + 1, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    rows = torch.randperm(len(compositions) + 2, generator=g)[:len(compositions)]
    req_to_token = torch.zeros(len(compositions) + 2, max(seq_lens) + 5, dtype=torch.int32)
    slots = torch.randperm(num_slots, generator=g)[:total] + 1
    off = 0
    for row, n in zip(rows.tolist(), seq_lens, strict=True):
        req_to_token[row, :n] = slots[off:off + n].int()
        off += n
    return k_buf, v_buf, req_to_token.to(DEVICE), rows.to(DEVICE)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out.float(), ref.float(), **tol(dtype))


# ---------------------------------------------------------------- extend attention

@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("composition", list(COMPOSITIONS))
@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("head_dim", [16, 64] if not CUDA else [64, 128])
def test_extend_attention(device, composition, heads, head_dim):
    hq, hkv = heads
    _run_extend(COMPOSITIONS[composition], hq, hkv, head_dim, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_extend_attention_dtypes(dtype):
    _run_extend(COMPOSITIONS["ragged"], 6, 2, 32, dtype)


def test_extend_attention_non_pow2_head_dim_and_strided_q():
    comp = COMPOSITIONS["ragged"]
    hq, hkv, d = 3, 1, 24
    k_buf, v_buf, r2t, rows = make_pool(comp, hkv, d, torch.float32, seed=3)
    T = sum(e for _, e in comp)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEVICE)
    q = qkv[:, :hq * d].view(T, hq, d)  # token stride (hq + 2 hkv) * d
    _check_extend(q, k_buf, v_buf, r2t, rows, comp, torch.float32)


def _run_extend(comp, hq, hkv, head_dim, dtype):
    k_buf, v_buf, r2t, rows = make_pool(comp, hkv, head_dim, dtype)
    T = sum(e for _, e in comp)
    q = torch.randn(T, hq, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    _check_extend(q, k_buf, v_buf, r2t, rows, comp, dtype)


def _check_extend(q, k_buf, v_buf, r2t, rows, comp, dtype):
    prefix = torch.tensor([p for p, _ in comp], device=DEVICE)
    ext = torch.tensor([e for _, e in comp], device=DEVICE)
    start = torch.cumsum(ext, 0) - ext
    scale = q.shape[-1] ** -0.5
    args = (q, k_buf, v_buf, r2t, rows, prefix, ext, start, scale)
    out = extend_attention(*args, max_extend_len=max(e for _, e in comp))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, extend_attention_ref(*args), dtype)


def test_extend_attention_ref_matches_sdpa():
    comp = [(0, 9), (0, 4)]
    k_buf, v_buf, r2t, rows = make_pool(comp, 2, 16, torch.float32)
    ext = torch.tensor([9, 4])
    q = torch.randn(13, 4, 16, device=DEVICE)
    ref = extend_attention_ref(q, k_buf, v_buf, r2t, rows, torch.zeros(2, dtype=torch.long), ext,
                               torch.tensor([0, 9]), 0.25)
    for i, (s, n) in enumerate([(0, 9), (9, 4)]):
        slots = r2t[rows[i], :n].long()
        k = k_buf[slots].repeat_interleave(2, 1).transpose(0, 1)  # (H, n, D)
        v = v_buf[slots].repeat_interleave(2, 1).transpose(0, 1)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[s:s + n].transpose(0, 1), k, v, is_causal=True, scale=0.25)
        torch.testing.assert_close(ref[s:s + n], sdpa.transpose(0, 1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- decode attention

@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("composition", list(COMPOSITIONS))
@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("num_kv_splits", [1, 4, None])
def test_decode_attention(device, composition, heads, num_kv_splits):
    hq, hkv = heads
    comp = COMPOSITIONS[composition]
    _check_decode(comp, hq, hkv, 64 if CUDA else 32, torch.float32, num_kv_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_dtypes(dtype):
    _check_decode(COMPOSITIONS["long_and_short"], 9, 3, 64, dtype, 3)


def test_decode_attention_more_splits_than_keys_and_workspace_reuse():
    comp = [(0, 1), (2, 1), (0, 3)]  # seq_lens 1, 3, 3 with 8 splits: most chunks are empty
    hq, hkv, d = 3, 3, 16
    k_buf, v_buf, r2t, rows = make_pool(comp, hkv, d, torch.float32)
    q = torch.randn(3, hq, d, device=DEVICE)
    seq = torch.tensor([p + e for p, e in comp], device=DEVICE)
    ws = (torch.full((5, hq, 8, d), float("nan"), device=DEVICE),
          torch.full((5, hq, 8), float("nan"), device=DEVICE))  # larger than the batch
    out = decode_attention(q, k_buf, v_buf, r2t, rows, seq, 0.3, num_kv_splits=8, workspace=ws)
    assert_close(out, decode_attention_ref(q, k_buf, v_buf, r2t, rows, seq, 0.3), torch.float32)


def _check_decode(comp, hq, hkv, d, dtype, num_kv_splits):
    k_buf, v_buf, r2t, rows = make_pool(comp, hkv, d, dtype, seed=2)
    q = torch.randn(len(comp), hq, d, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    seq = torch.tensor([p + e for p, e in comp], device=DEVICE)
    out = decode_attention(q, k_buf, v_buf, r2t, rows, seq, d ** -0.5, num_kv_splits=num_kv_splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, decode_attention_ref(q, k_buf, v_buf, r2t, rows, seq, d ** -0.5), dtype)


def test_decode_attention_ref_matches_sdpa():
    comp = [(10, 1), (0, 1)]
    k_buf, v_buf, r2t, rows = make_pool(comp, 1, 16, torch.float32)
    q = torch.randn(2, 2, 16, device=DEVICE)
    ref = decode_attention_ref(q, k_buf, v_buf, r2t, rows, torch.tensor([11, 1]), 0.25)
    for i, n in enumerate([11, 1]):
        slots = r2t[rows[i], :n].long()
        k = k_buf[slots].expand(n, 2, 16).transpose(0, 1)
        v = v_buf[slots].expand(n, 2, 16).transpose(0, 1)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[i][:, None], k, v, scale=0.25)
        torch.testing.assert_close(ref[i], sdpa[:, 0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- store_kv

@pytest.mark.parametrize("dtype,buf_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_store_kv_from_fused_qkv_view(dtype, buf_dtype):
    T, hq, hkv, d = (37, 4, 2, 16) if not CUDA else (4096, 32, 8, 128)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEVICE).to(dtype)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    loc = (torch.randperm(T + 10)[:T] + 1).to(DEVICE)
    bufs = [torch.zeros(T + 11, hkv, d, dtype=buf_dtype, device=DEVICE) for _ in range(4)]
    store_kv(k, v, bufs[0], bufs[1], loc)
    store_kv_ref(k, v, bufs[2], bufs[3], loc)
    assert torch.equal(bufs[0], bufs[2]) and torch.equal(bufs[1], bufs[3])
    assert not bufs[0][0].any(), "slot 0 must not be written"


# ---------------------------------------------------------------- rmsnorm

ELEMENTWISE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ew_tol(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
            torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2}}[dtype]


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("hidden", [64, 96] if not CUDA else [576, 4096])
def test_rmsnorm(dtype, hidden):
    T = 9 if not CUDA else 1000
    g = torch.Generator().manual_seed(0)
    x_wide = torch.randn(T, hidden + 8, generator=g).to(DEVICE, dtype)
    x = x_wide[:, :hidden]  # row stride != hidden
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    res = torch.randn(T, hidden, generator=g).to(DEVICE, dtype)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), **_ew_tol(dtype))
    x_before, res_before = x.clone(), res.clone()
    out, new_res = fused_add_rmsnorm(x, res, w, 1e-5)
    ref_out, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-5)
    # Exact, except that the interpreter truncates (not rounds) float32 -> bfloat16 casts.
    exact = {"atol": 0, "rtol": 0} if CUDA or dtype != torch.bfloat16 else _ew_tol(dtype)
    torch.testing.assert_close(new_res, ref_res, **exact)
    torch.testing.assert_close(out, ref_out, **_ew_tol(dtype))
    assert torch.equal(x, x_before) and torch.equal(res, res_before), "inputs must be untouched"


# ---------------------------------------------------------------- rotary

@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary(dtype, inplace):
    T, hq, hkv, d = (11, 3, 1, 16) if not CUDA else (2048, 32, 8, 128)
    cos, sin = build_rope_cache(d, 4096, 500000.0, device=DEVICE)
    # Views of Hugging Face-style (max_pos, D) tables, cat(freqs, freqs): row stride D, not D/2.
    cos, sin = torch.cat([cos, cos], -1)[:, :d // 2], torch.cat([sin, sin], -1)[:, :d // 2]
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    positions = torch.randint(0, 4096, (T,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_q, ref_k = rotary_ref(q, k, positions, cos, sin)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    out_q, out_k = rotary(q, k, positions, cos, sin, inplace=inplace)
    torch.testing.assert_close(out_q, ref_q, **_ew_tol(dtype))
    torch.testing.assert_close(out_k, ref_k, **_ew_tol(dtype))
    if inplace:
        assert out_q.data_ptr() == q.data_ptr() and torch.equal(q, out_q)
    else:
        assert not torch.equal(q, out_q)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before), "v must be untouched"


def test_rotary_ref_matches_hugging_face():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, h, d = 7, 2, 32
    cos, sin = build_rope_cache(d, 64, 10000.0)
    q, k = torch.randn(T, h, d), torch.randn(T, h, d)
    pos = torch.tensor([0, 1, 5, 9, 33, 63, 2])
    ref_q, ref_k = rotary_ref(q, k, pos, cos, sin)
    hf_cos = torch.cat([cos, cos], -1)[pos][None]  # (1, T, D)
    hf_sin = torch.cat([sin, sin], -1)[pos][None]
    hf_q, hf_k = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            hf_cos, hf_sin)
    torch.testing.assert_close(ref_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
], ids=["linear", "llama3"])
def test_rope_cache_matches_hugging_face(scaling):
    transformers = pytest.importorskip("transformers")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from radixflow.kernels.rope_cache import rope_inv_freq

    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_theta=500000.0,
                                   rope_scaling=dict(scaling), max_position_embeddings=131072)
    hf_inv_freq, attention_factor = rope_utils.ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(rope_inv_freq(128, 500000.0, scaling), hf_inv_freq.float(),
                               atol=0, rtol=1e-6)
    cos, sin = build_rope_cache(128, 100, 500000.0, scaling)
    angles = torch.arange(100.0)[:, None] * hf_inv_freq.float()[None, :]
    torch.testing.assert_close(cos, angles.cos()) and torch.testing.assert_close(sin, angles.sin())


def test_rope_cache_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        build_rope_cache(64, 16, scaling={"rope_type": "yarn", "factor": 2.0})


# ---------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("inter", [40, 1100] if not CUDA else [1536, 14336])
def test_silu_and_mul(dtype, inter):
    T = 5 if not CUDA else 512
    x = (3 * torch.randn(T, 2 * inter, generator=torch.Generator().manual_seed(0))).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **_ew_tol(dtype))


# ---------------------------------------------------------------- launch checks

def test_cpu_tensors_without_interpreter_fail_clearly():
    if CUDA:
        pytest.skip("on CUDA machines the compiled kernels exist; this checks the CPU error path")
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); import torch\n"
            "from radixflow.kernels.activation import silu_and_mul\n"
            "try:\n    silu_and_mul(torch.zeros(2, 8))\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_wrappers_reject_bad_shapes():
    q = torch.randn(4, 6, 16, device=DEVICE)
    k_buf = torch.randn(10, 4, 16, device=DEVICE)  # 6 q heads over 4 kv heads: not GQA
    r2t = torch.zeros(2, 8, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(AssertionError, match="multiple"):
        extend_attention(q, k_buf, k_buf, r2t, idx, idx, idx + 4, idx, 1.0)
    with pytest.raises(AssertionError):
        decode_attention(q, k_buf[:, :2], k_buf[:, :2], r2t.long(), idx, idx + 1, 1.0)
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))
