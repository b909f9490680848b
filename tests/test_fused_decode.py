"""The fused CPU decode step (kernels/cpu_decode_step.py, runtime/model/fused_decode.py): bitwise
the Python path's layers on a tiny random model (every KV pool dtype, its K/V stores byte for byte
torch's casts), the same tokens and logprobs on the default model (fp16, fp32 and fp8 KV, batch 1,
ragged batches, a radix-cache hit), and taken only when it applies."""

from __future__ import annotations

import pytest
import torch

from radixflow.kernels import cpu_decode_step, cpu_ext, cpu_quant
from radixflow.kernels.cpu_decode_step import DecodeStep, LayerWeights
from radixflow.runtime.engine import Engine
from radixflow.runtime.model import fused_decode
from radixflow.runtime.model.attention.torch_backend import TorchAttnBackend
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode
from radixflow.runtime.model.memory_pool import KVPool, ReqToTokenPool

pytestmark = pytest.mark.skipif(not cpu_decode_step.available(), reason="no C compiler for the CPU kernels")

H, HKV, D, HIDDEN, INTER, EPS = 4, 2, 16, 64, 96, 1e-5


def _tiny_layers(kv_dtype: torch.dtype, n_layers: int = 2, slots: int = 400) -> list[LayerWeights]:
    g = torch.Generator().manual_seed(0)

    def qw(n: int, k: int, scheme: str = "int4") -> cpu_quant.QuantWeight:
        return cpu_quant.quantize(torch.randn(n, k, generator=g) * 0.3, scheme)

    def buf() -> torch.Tensor:
        return torch.randn(slots, HKV, D, generator=g).to(kv_dtype)

    return [LayerWeights(qw((H + 2 * HKV) * D, HIDDEN), torch.randn((H + 2 * HKV) * D, generator=g),
                         qw(HIDDEN, H * D, "int8"), qw(2 * INTER, HIDDEN), qw(HIDDEN, INTER),
                         1 + 0.1 * torch.randn(HIDDEN, generator=g), 1 + 0.1 * torch.randn(HIDDEN, generator=g),
                         buf(), buf()) for _ in range(n_layers)]


def _rope_cache(max_pos: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(torch.arange(max_pos).float(), inv)] * 2, dim=-1)
    return emb.cos(), emb.sin()


def _python_layers(layers: list[LayerWeights], x, pos, loc, r2t, rows, lens, cos, sin):
    """runtime/model/llama.py's DecoderLayer path, op for op, on the same kernels."""
    residual, T, q, kv = None, x.shape[0], H * D, HKV * D
    for ly in layers:
        if residual is None:
            residual, h = x, cpu_ext.rms_norm(x, ly.in_norm, EPS)
        else:
            h, residual = cpu_ext.rms_norm(x, ly.in_norm, EPS, residual)
        qkv = cpu_quant.linear(h, ly.qkv, ly.qkv_bias)
        qk = cpu_ext.rope_(qkv[:, :q + kv].view(T, H + HKV, D), pos, cos, sin)
        _set_kv(ly.k_buffer, loc, qkv[:, q:q + kv].view(T, HKV, D))
        _set_kv(ly.v_buffer, loc, qkv[:, q + kv:].view(T, HKV, D))
        o = cpu_ext.decode_attention(qk[:, :H], ly.k_buffer, ly.v_buffer, r2t, rows, lens, D ** -0.5)
        h, residual = cpu_ext.rms_norm(cpu_quant.linear(o.view(T, q), ly.o), ly.post_norm, EPS, residual)
        x = cpu_quant.linear(cpu_ext.silu_mul(cpu_quant.linear(h, ly.gate_up)), ly.down)
    return x, residual


def _set_kv(buf: torch.Tensor, loc: torch.Tensor, x: torch.Tensor) -> None:
    """KVPool.set_kv's write: torch's cast to the pool dtype; fp8 copied as bytes (no index_copy_)."""
    x = x.to(buf.dtype)
    if buf.element_size() == 1:
        buf, x = buf.view(torch.uint8), x.view(torch.uint8)
    buf.index_copy_(0, loc, x)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two pool buffers (fp8 included, NaN codes too)."""
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _copy(layers: list[LayerWeights]) -> list[LayerWeights]:
    return [LayerWeights(**{**ly.__dict__, "k_buffer": ly.k_buffer.clone(), "v_buffer": ly.v_buffer.clone()})
            for ly in layers]


KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("lens,prefix", [([37], 0), ([5, 130, 64], 0), ([1, 2, 3, 4, 300, 65, 9], 0),
                                         ([100, 71, 140], 70)])
def test_step_is_bitwise_the_python_layers(kv_dtype, lens, prefix):
    """prefix: the first `prefix` slots are the same for every row (a radix-cache hit)."""
    layers = _tiny_layers(kv_dtype)
    cos, sin = _rope_cache()
    M = len(lens)
    r2t = torch.zeros(M + 2, 320, dtype=torch.int32)
    perm = (torch.randperm(399, generator=torch.Generator().manual_seed(1)) + 1).to(torch.int32)
    at = prefix
    for i, n in enumerate(lens):  # row i + 1 holds request i's slots, scattered over the pool
        r2t[i + 1, :prefix] = perm[:prefix]
        r2t[i + 1, prefix:n] = perm[at:at + n - prefix]
        at += n - prefix
    rows = torch.arange(1, M + 1)
    seq = torch.tensor(lens)
    pos, loc = seq - 1, r2t[rows, seq - 1].long()
    x = torch.randn(M, HIDDEN, generator=torch.Generator().manual_seed(2))
    ref = _copy(layers)
    want_x, want_res = _python_layers(ref, x.clone(), pos, loc, r2t, rows, seq, cos, sin)
    step = DecodeStep(layers, H, HKV, D, EPS, cos, sin)
    step.timing = True
    got_x = x.clone()
    got_res = step.run(got_x, pos, loc, r2t, rows, seq, torch.get_num_threads(), 1, cpu_quant.INT_MAX_M)
    assert torch.equal(got_x, want_x) and torch.equal(got_res, want_res)
    for a, b in zip(layers, ref):  # the new tokens' K/V, rounded to the pool's dtype as torch rounds
        assert _same_bytes(a.k_buffer, b.k_buffer) and _same_bytes(a.v_buffer, b.v_buffer)
    assert step.matmul_ns > 0 and step.attention_ns > 0


def _cast_sweep() -> torch.Tensor:
    """fp32 values where a cast to fp8 can go wrong: every finite fp8 value of either format, the
    ties between neighbours and one ulp either side of them (subnormals and the top of the range
    included), overflow, +-inf, NaNs of either sign, and random bit patterns (every exponent)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    inf = torch.tensor(float("inf"))
    vals = []
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        f = codes.view(dt).float()
        f = torch.cat([f[f.isfinite()], torch.tensor([480.0, 65536.0])]).unique()  # sorted; one past the top
        mid = (f[1:] + f[:-1]) / 2  # exact in fp32
        vals += [f, mid, torch.nextafter(mid, inf), torch.nextafter(mid, -inf)]
    specials = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x80000001,
                             0x00000001, 0x7F7FFFFF], dtype=torch.int64).to(torch.int32).view(torch.float32)
    bits = torch.randint(-2**31, 2**31, (512,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    vals += [specials, 1e30 * torch.tensor([1.0, -1.0]), bits.to(torch.int32).view(torch.float32)]
    v = torch.cat(vals)
    return torch.cat([v, -v])


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_step_stores_fp8_bytes_as_torch_casts(kv_dtype):
    """V = the q/k/v bias (the weights zero): the step's fp8 stores are byte for byte the Python
    path's torch cast (e4m3 saturates at +-448, e5m2 overflows to +-inf, NaN keeps its sign) over
    _cast_sweep, 32 values a step through the bias, changed in place (one layer: a NaN or inf V
    makes the next layer's input NaN, and 0 * NaN is no longer the bias)."""
    ly = _tiny_layers(kv_dtype, n_layers=1)[0]
    zero = cpu_quant.quantize(torch.zeros(ly.qkv.shape), "int4")
    ly = LayerWeights(**{**ly.__dict__, "qkv": zero, "qkv_bias": ly.qkv_bias.clone()})
    cos, sin = _rope_cache()
    step = DecodeStep([ly], H, HKV, D, EPS, cos, sin)
    vals, kv = _cast_sweep(), HKV * D
    r2t = torch.arange(1, 321, dtype=torch.int32).view(1, 320)
    row = torch.zeros(1, dtype=torch.int64)
    for n, chunk in enumerate(vals.split(kv), start=1):  # step n: slot n, keys 1..n
        ly.qkv_bias[-chunk.numel():] = chunk
        loc = torch.tensor([n])
        ref = _copy([ly])
        x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(n))
        _python_layers(ref, x.clone(), loc - 1, loc, r2t, row, loc, cos, sin)
        step.run(x, loc - 1, loc, r2t, row, loc, 1, 1, cpu_quant.INT_MAX_M)
        assert _same_bytes(ly.v_buffer[n], ref[0].v_buffer[n]) and _same_bytes(ly.k_buffer[n], ref[0].k_buffer[n])
        got, want = ly.v_buffer[n].view(-1)[-chunk.numel():], chunk.to(kv_dtype)
        nz = chunk != 0  # V is the bias itself (0 + -0 may come out +0)
        assert _same_bytes(got[nz], want[nz])


def test_step_rejects_out_of_range_indices_before_writing():
    layers = _tiny_layers(torch.float16)
    before = [ly.k_buffer.clone() for ly in layers]
    step = DecodeStep(layers, H, HKV, D, EPS, *_rope_cache(64))
    r2t = torch.ones(2, 100, dtype=torch.int32)
    one = torch.ones(1, dtype=torch.int64)
    for pos, loc, row, n in [(64, 1, 0, 1), (0, 400, 0, 1), (0, 1, 2, 1), (0, 1, 0, 101), (0, 1, 0, 0)]:
        with pytest.raises(ValueError, match="out of range"):
            step.run(torch.randn(1, HIDDEN), one * pos, one * loc, r2t, one * row, one * n, 1, 1, 8)
    assert all(torch.equal(a, ly.k_buffer) for a, ly in zip(before, layers))
    with pytest.raises(ValueError, match="x must be"):
        step.run(torch.randn(1, HIDDEN + 1), one, one, r2t, one, one, 1, 1, 8)
    with pytest.raises(ValueError, match="unsupported shape"):
        DecodeStep(layers, 3, HKV, D, EPS, *_rope_cache(64))
    with pytest.raises(ValueError, match="KV pool dtype"):  # one the attention kernel does not read
        DecodeStep(_tiny_layers(torch.float64), H, HKV, D, EPS, *_rope_cache(64))


def test_backend_defers_the_decode_plan_of_small_batches():
    """lazy_decode_rows (set by the fused step): no plan in init_forward_metadata, the same
    attention when the Python path asks for it."""
    pool, r2t = KVPool(1000, 1, HKV, D, torch.float16), ReqToTokenPool(4, 512)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    shared = torch.arange(1, 401, dtype=torch.int32)
    for row in (0, 1, 2):  # a 400-token shared prefix: the eager plan is a cascade
        r2t.req_to_token[row, :400] = shared
        r2t.req_to_token[row, 400:410] = torch.arange(500 + 10 * row, 510 + 10 * row, dtype=torch.int32)
    q = torch.randn(3, H, D)
    outs = []
    for lazy in (0, 4):
        backend = TorchAttnBackend(pool, r2t)
        backend.lazy_decode_rows = lazy
        batch = ForwardBatch.build(ForwardMode.DECODE, [0] * 3, [0, 1, 2], [409] * 3, [1] * 3,
                                   torch.zeros(3, dtype=torch.int64), "cpu")
        backend.init_forward_metadata(batch)
        assert (batch.attn_metadata is None) == bool(lazy)
        outs.append(backend.forward_decode(q, 0, batch, 0.25))
        assert batch.attn_metadata.segments  # planned (a cascade) on the first call
    assert torch.equal(outs[0], outs[1])


# -- the default model ----------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a land far far away, there lived a"]
SHARED = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)  # ~130 tokens: a cascade prefix


@pytest.fixture(scope="module", params=["float16", "float32", "fp8_e4m3", "fp8_e5m2"])
def qengine(request, default_model_path):
    """The quantized default model; float16 is the CPU's "auto" KV dtype."""
    eng = Engine(default_model_path, max_total_tokens=2048, max_running_requests=4,
                 kv_cache_dtype="auto" if request.param == "float16" else request.param)
    want = {"float16": torch.float16, "float32": torch.float32, "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2}[request.param]
    assert eng.scheduler.runner.kv_pool.dtype == want
    yield eng
    eng.shutdown()


def _run(eng: Engine, monkeypatch, on: bool, prompts: list[str], n: int) -> tuple[list, int]:
    """(per prompt: output ids and their logprobs), fused steps taken; the cache flushed first."""
    monkeypatch.setenv(fused_decode.ENV, "1" if on else "0")
    eng.flush_cache()
    model = eng.scheduler.runner.model
    before = 0 if model._fused_decode is None else model._fused_decode.steps
    outs = eng.generate(prompts, {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}, return_logprob=True)
    res = [(o["meta_info"]["output_token_logprobs"]) for o in outs]
    after = 0 if model._fused_decode is None else model._fused_decode.steps
    return [([t[1] for t in r], [t[0] for t in r]) for r in res], after - before


def _same(a: list, b: list, atol: float) -> None:
    for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=atol)


def test_fused_step_gives_the_python_path_tokens(qengine, monkeypatch):
    assert qengine.scheduler.runner.quantization == "gguf"
    ref, steps = _run(qengine, monkeypatch, False, PROMPTS[:1], 8)
    assert steps == 0
    got, steps = _run(qengine, monkeypatch, True, PROMPTS[:1], 8)
    assert steps == 7  # every decode step at batch 1 (the first token comes from the prefill)
    _same(ref, got, 0)  # bitwise: the same kernels on the same values
    ref, _ = _run(qengine, monkeypatch, False, PROMPTS, 6)  # ragged lengths in one batch
    got, steps = _run(qengine, monkeypatch, True, PROMPTS, 6)
    assert steps >= 5
    _same(ref, got, 0)


def test_fused_step_after_a_radix_cache_hit(qengine, monkeypatch):
    """Requests sharing a cached prefix (the Python path attends it as a cascade: rounding differs)."""
    prompts = [SHARED + " And then", SHARED + " Finally,", SHARED + " 1, 2,"]
    outs = []
    for on in (False, True):
        monkeypatch.setenv(fused_decode.ENV, "1" if on else "0")
        qengine.flush_cache()
        qengine.generate(SHARED, {"temperature": 0, "max_new_tokens": 1})  # cache the prefix
        res = qengine.generate(prompts, {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
                               return_logprob=True)
        assert all(r["meta_info"]["cached_tokens"] > 100 for r in res)
        outs.append([([t[1] for t in r["meta_info"]["output_token_logprobs"]],
                      [t[0] for t in r["meta_info"]["output_token_logprobs"]]) for r in res])
    _same(outs[0], outs[1], 1e-3)


def test_many_rows_take_the_fused_step_unless_they_share_a_prefix(qengine, monkeypatch):
    """From MAX_ROWS rows on (2 here), unrelated requests still take the step, bitwise the Python
    path's; requests sharing a cached prefix keep the Python path, whose cascade reads it once."""
    monkeypatch.setattr(fused_decode, "MAX_ROWS", 2)  # 2 rows are no longer "few"
    ref, _ = _run(qengine, monkeypatch, False, PROMPTS, 4)
    got, steps = _run(qengine, monkeypatch, True, PROMPTS, 4)
    assert steps >= 3
    _same(ref, got, 0)
    qengine.generate(SHARED, {"temperature": 0, "max_new_tokens": 1})  # cache the prefix
    fd = qengine.scheduler.runner.model._fused_decode
    before = fd.steps
    res = qengine.generate([SHARED + " And then", SHARED + " Finally,"],
                           {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
    assert all(r["meta_info"]["cached_tokens"] > 100 for r in res)
    assert fd.steps == before


def test_fused_step_not_taken_when_a_condition_fails(qengine, monkeypatch):
    model = qengine.scheduler.runner.model
    backend = qengine.scheduler.runner.attn_backend
    assert fused_decode.state(model, backend).step is not None
    assert backend.lazy_decode_rows == fused_decode.MAX_ROWS  # the step reads no decode plan
    monkeypatch.setattr(backend, "use_cpu_kernel", False)
    fd = fused_decode.FusedDecode(model, backend)
    assert fd.step is None and "in place" in fd.reason
    monkeypatch.undo()
    monkeypatch.setattr(model.layers[3].mlp.down_proj, "tp", None, raising=False)  # a row-parallel layer
    assert fused_decode.FusedDecode(model, backend).reason == "tensor-parallel layers"


def test_fp32_weights_keep_the_python_path(engine):
    """quantization='none' (the session's fp32 engine): no fused step."""
    engine.generate("Hello", {"temperature": 0, "max_new_tokens": 3})
    fd = engine.scheduler.runner.model._fused_decode
    assert fd is not None and fd.step is None and fd.reason == "a linear layer is not quantized"
