"""The compiled CPU kernels (decode attention, RMSNorm) against their PyTorch references, and in use."""

from __future__ import annotations

import pytest
import torch

from radixflow.kernels import cpu_ext
from radixflow.kernels.reference import decode_attention_ref, fused_add_rmsnorm_ref, rmsnorm_ref
from radixflow.runtime.model.attention.torch_backend import TorchAttnBackend
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.memory_pool import KVPool, ReqToTokenPool

pytestmark = pytest.mark.skipif(not cpu_ext.available(), reason="no C compiler for the CPU kernels")


def _world(hkv: int, d: int, lens: list[int], scattered: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    slots = sum(lens) + 64
    k = torch.randn(slots, hkv, d, generator=g)
    v = torch.randn(slots, hkv, d, generator=g)
    r2t = torch.zeros(len(lens) + 3, max(lens) + 5, dtype=torch.int32)
    perm = torch.randperm(slots, generator=g) if scattered else torch.arange(slots)
    rows = torch.randperm(r2t.shape[0], generator=g)[:len(lens)]
    at = 0
    for row, n in zip(rows.tolist(), lens):
        r2t[row, :n] = perm[at:at + n].to(torch.int32)
        at += n
    return k, v, r2t, rows, torch.tensor(lens)


# G = hq / hkv of 1, 2, 3, 5, 8 and head dims that are and are not multiples of 32 (and of 8:
# d=36 takes the portable loop) cover every branch of the vectorized path.
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 1, 128), (10, 2, 40), (6, 3, 36)])
@pytest.mark.parametrize("scattered", [False, True])
def test_decode_kernel_matches_reference(hq, hkv, d, scattered):
    lens = [1, 7, 64, 65, 200, 3]  # block edges: 64 keys per block
    k, v, r2t, rows, sl = _world(hkv, d, lens, scattered)
    q = torch.randn(len(lens), hq, d)
    want = decode_attention_ref(q, k, v, r2t, rows, sl, d ** -0.5)
    for threads in (None, 1, 3):  # the pool's default, the caller alone, more threads than cores
        got = cpu_ext.decode_attention(q, k, v, r2t, rows, sl, d ** -0.5, threads)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (10, 2, 40), (6, 3, 36)])
def test_decode_kernel_reads_half_precision_pools(hq, hkv, d, dtype):
    """An fp16 / bf16 / fp8 pool is read in place and computed in fp32: the fp32 reference on the
    same (rounded) values, on the vectorized path and the portable one (d = 36)."""
    lens = [1, 65, 200]
    k, v, r2t, rows, sl = _world(hkv, d, lens, True)
    k, v = k.to(dtype), v.to(dtype)
    q = torch.randn(len(lens), hq, d)
    want = decode_attention_ref(q, k.float(), v.float(), r2t, rows, sl, d ** -0.5)
    got = cpu_ext.decode_attention(q, k, v, r2t, rows, sl, d ** -0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("d", [8, 4])  # vectorized, portable
def test_decode_kernel_reads_every_fp8_code_exactly(dtype, d):
    """One key per request: the output is that key's V row, so every finite fp8 code (subnormals
    and signs included) must come out as torch converts it."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    codes = codes[codes.float().isfinite()]
    rows_n = (codes.numel() + d - 1) // d
    vals = torch.zeros(rows_n * d, dtype=dtype)
    vals[:codes.numel()] = codes
    v = torch.cat([torch.zeros(1, d, dtype=dtype), vals.view(rows_n, d)]).view(-1, 1, d)
    r2t = torch.arange(1, rows_n + 1, dtype=torch.int32).view(rows_n, 1)
    got = cpu_ext.decode_attention(torch.randn(rows_n, 1, d), v.clone(), v, r2t, torch.arange(rows_n),
                                   torch.ones(rows_n, dtype=torch.int64), 1.0)
    assert torch.equal(got.view(-1)[:codes.numel()], codes.float())


def test_decode_kernel_large_scores_do_not_overflow():
    k, v, r2t, rows, sl = _world(2, 16, [50, 130], False)
    q = torch.randn(2, 4, 16) * 100  # softmax of scores in the thousands: max-subtraction must hold
    got = cpu_ext.decode_attention(q, k * 10, v, r2t, rows, sl, 1.0)
    want = decode_attention_ref(q, k * 10, v, r2t, rows, sl, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_kernel_rejects_bad_input():
    k, v, r2t, rows, sl = _world(2, 16, [5, 9], False)
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="k_buffer must be a contiguous fp32"):
        cpu_ext.decode_attention(q, k.double(), v.double(), r2t, rows, sl, 1.0)
    with pytest.raises(ValueError, match="v_buffer must be .* like k_buffer"):
        cpu_ext.decode_attention(q, k.bfloat16(), v, r2t, rows, sl, 1.0)
    with pytest.raises(ValueError, match="req_to_token must be a contiguous int32"):
        cpu_ext.decode_attention(q, k, v, r2t.long(), rows, sl, 1.0)
    with pytest.raises(ValueError, match="rows and seq_lens must have shape"):
        cpu_ext.decode_attention(q, k, v, r2t, rows[:1], sl, 1.0)
    with pytest.raises(ValueError, match="not supported by the CPU kernel"):
        cpu_ext.decode_attention(torch.randn(2, 3, 16), k, v, r2t, rows, sl, 1.0)  # 3 q heads on 2 kv heads


def test_backend_uses_kernel_for_plain_decode_and_cascade_for_shared_prefixes():
    hkv, d, hq = 3, 64, 9
    pool = KVPool(2000, 1, hkv, d, torch.float32)
    r2t = ReqToTokenPool(8, 1024)
    backend = TorchAttnBackend(pool, r2t)
    assert backend.use_cpu_kernel
    torch.manual_seed(0)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    # Rows 0..3: private keys; rows 4..6: a 300-token shared prefix and private tails.
    at = 1
    for row, n in enumerate([40, 300, 5, 77]):
        r2t.req_to_token[row, :n] = torch.arange(at, at + n, dtype=torch.int32)
        at += n
    shared = torch.arange(at, at + 300, dtype=torch.int32)
    at += 300
    for row in (4, 5, 6):
        r2t.req_to_token[row, :300] = shared
        r2t.req_to_token[row, 300:310] = torch.arange(at, at + 10, dtype=torch.int32)
        at += 10
    for rows, lens, cascade in [([0, 1, 2, 3], [40, 300, 5, 77], False), ([4, 5, 6], [310] * 3, True)]:
        batch = ForwardBatch.build(ForwardMode.DECODE, [0] * len(rows), rows, [n - 1 for n in lens],
                                   [1] * len(rows), torch.zeros(len(rows), dtype=torch.int64), "cpu")
        backend.init_forward_metadata(batch)
        assert batch.attn_metadata.in_place is not cascade
        q = torch.randn(len(rows), hq, d)
        got = backend.forward_decode(q, 0, batch, 0.125).view(len(rows), hq, d)
        want = decode_attention_ref(q, pool.k_buffer[0], pool.v_buffer[0], r2t.req_to_token,
                                    batch.req_pool_indices, batch.seq_lens, 0.125)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 5, 32), (0, 16), (2, 13)])
def test_rms_norm_kernel_matches_reference(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 3
    r = torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    flat = (-1, shape[-1])
    got = cpu_ext.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, rmsnorm_ref(x.reshape(flat), w, 1e-5).reshape(shape), rtol=1e-5, atol=1e-6)
    out, total = cpu_ext.rms_norm(x, w, 1e-5, residual=r)
    want, want_total = fused_add_rmsnorm_ref(x.reshape(flat), r.reshape(flat), w, 1e-5)
    assert torch.equal(total, x + r)  # the same fp32 sum the unfused layer computes
    torch.testing.assert_close(out, want.reshape(shape), rtol=1e-5, atol=1e-6)
    assert x.numel() == 0 or total.data_ptr() not in (x.data_ptr(), r.data_ptr())  # inputs untouched


def test_rms_norm_kernel_rejects_bad_input():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="x must be a contiguous fp32"):
        cpu_ext.rms_norm(x.t(), torch.randn(4), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        cpu_ext.rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="x must be"):
        cpu_ext.rms_norm(x.double(), w, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        cpu_ext.rms_norm(x, w, 1e-5, residual=torch.randn(4, 9))


def test_model_norm_uses_kernel_and_agrees_with_torch_path():
    from radixflow.runtime.model.llama import RMSNorm

    norm = RMSNorm(32, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x, r = torch.randn(6, 32), torch.randn(6, 32)
    h, s = norm(x, r)
    torch.testing.assert_close(h, norm._norm(x + r), rtol=1e-5, atol=1e-6)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(norm(x), norm._norm(x), rtol=1e-5, atol=1e-6)
    # A strided input takes the torch path and gives the same answer.
    xt = torch.randn(32, 6).t()
    torch.testing.assert_close(norm(xt), norm(xt.contiguous()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 5, 600])  # 600 x 12 x 64: split among the pool's threads
def test_rope_kernel_rotates_a_strided_view_in_place_like_the_torch_path(T):
    from radixflow.runtime.model.llama import RotaryEmbedding
    from radixflow.runtime.model.model_config import ModelConfig

    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64 * 9,
                                 "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "vocab_size": 32, "rope_theta": 10000.0})
    rope = RotaryEmbedding(cfg, 2048)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(T, 15 * 64, generator=g)  # q (9 heads), k (3), v (3)
    qk = qkv[:, :12 * 64].view(T, 12, 64)
    positions = torch.randint(0, 2048, (T,), generator=g)
    want = rope.rotate(positions, qk)
    v_before = qkv[:, 12 * 64:].clone()
    got = cpu_ext.rope_(qk, positions, rope.cos_cache, rope.sin_cache)
    assert got.data_ptr() == qkv.data_ptr()  # rotated in place, in the fused projection
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, 12 * 64:], v_before)  # v untouched


def test_rope_kernel_rejects_bad_input():
    cos, sin = torch.randn(16, 8), torch.randn(16, 8)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 16\)"):
        cpu_ext.rope_(x, torch.tensor([0, 16, 1]), cos, sin)
    assert torch.equal(x, x.clone())
    with pytest.raises(ValueError, match="rows must be contiguous"):
        cpu_ext.rope_(torch.randn(3, 8, 2).transpose(1, 2), torch.tensor([0, 1, 2]), cos, sin)
    with pytest.raises(ValueError, match="D even"):
        cpu_ext.rope_(torch.randn(3, 2, 7), torch.tensor([0, 1, 2]), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="cos_cache must be"):
        cpu_ext.rope_(x, torch.tensor([0, 1, 2]), cos[:, :4], sin)
    with pytest.raises(ValueError, match="positions must have shape"):
        cpu_ext.rope_(x, torch.tensor([0, 1]), cos, sin)
    with pytest.raises(ValueError, match="fp32"):
        cpu_ext.rope_(x.double(), torch.tensor([0, 1, 2]), cos, sin)


@pytest.mark.parametrize("M,inter", [(1, 1536), (16, 13), (300, 1536), (0, 8)])
def test_silu_mul_kernel_matches_torch(M, inter):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, 2 * inter + 5, generator=g) * 6  # large |x|: both branches of the sigmoid
    gate_up = x[:, :2 * inter]  # strided rows
    want = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    got = cpu_ext.silu_mul(gate_up)
    assert got.shape == (M, inter) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    big = torch.tensor([[-100.0, 100.0, 1.0, 1.0]])
    torch.testing.assert_close(cpu_ext.silu_mul(big), torch.tensor([[0.0, 100.0]]))
    with pytest.raises(ValueError, match=r"\(M, 2 \* I\)"):
        cpu_ext.silu_mul(torch.randn(2, 3))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        cpu_ext.silu_mul(torch.randn(4, 2).t())
