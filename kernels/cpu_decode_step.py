"""Every decoder layer of a decode step in one C call, on quantized weights (cpu_decode_step.c).

  DecodeStep(layers, heads, kv_heads, head_dim, eps, cos_cache, sin_cache)
      the pointer table of one model and KV pool, built once after load
  step.run(x, positions, out_loc, req_to_token, rows, seq_lens) -> residual
      x (M, hidden) embedded tokens in, the last layer's output out (in place)

Per layer: input RMSNorm (residual add fused), q/k/v matmul, rope on q and k, k/v stored into the
pool at out_loc (fp32, fp16, bf16 or fp8 e4m3 / e5m2: cast byte for byte as torch's .to()),
decode attention over each row's req_to_token slots, o_proj, post-attention RMSNorm + residual,
gate/up, SiLU-and-multiply, down: the ops of runtime/model/llama.py's DecoderLayer on the kernels
its Python path calls (rmsnorm_f32, cpu_quant's qm_linear through a function pointer, rope_f32,
decode_attention_f32, silu_mul_f32), so the result is bitwise that path's with the in-place
attention kernel. The final norm is the caller's:
norm(x + residual). Weights are handed to qm_linear as opaque pointers (QuantWeight's qs, d, m).

Optional timing: `step.timing = True` makes each run add its nanoseconds in matmuls and in
attention to `step.matmul_ns` / `step.attention_ns`. Built into cpu_ext's library;
`available()` is False without a C compiler (callers keep the Python path).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from radixflow.kernels import cpu_ext, cpu_quant
from radixflow.kernels.cpu_quant import QuantWeight

# fp32, fp16, bf16, fp8 e4m3 / e5m2: decode_attention_f32's kv_dtype codes, which the step's K/V stores share
_KV_DTYPES = cpu_ext.KV_DTYPE_CODES
_MAX_G, _MAX_D = 16, 256  # cpu_decode_attention.c's limits
_ERRORS = {-1: (ValueError, "a position, slot, request row or key count is out of range"),
           -2: (MemoryError, "scratch allocation failed"),
           -3: (ValueError, "head counts not supported by the attention kernel")}


class _QWeight(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("qs", ctypes.c_void_p), ("d", ctypes.c_void_p),
                ("m", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _QWeight), ("o", _QWeight), ("gate_up", _QWeight), ("down", _QWeight),
                ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("k_buf", ctypes.c_void_p), ("v_buf", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_void_p), ("n_layers", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("inter", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("cache_stride", ctypes.c_int64),
                ("max_pos", ctypes.c_int64), ("kv_dtype", ctypes.c_int64), ("num_slots", ctypes.c_int64),
                ("linear", ctypes.c_void_p)]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: quantized (N, K) weights with optional fp32 (N,) biases, fp32 (hidden,)
    norm weights, and this layer's K/V pool buffers (slots, kv_heads, head_dim)."""

    qkv: QuantWeight
    qkv_bias: torch.Tensor | None
    o: QuantWeight
    gate_up: QuantWeight
    down: QuantWeight
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor


def available() -> bool:
    """Whether the fused step can run: cpu_ext's and cpu_quant's libraries both built."""
    return cpu_ext.available() and cpu_quant.linear_fn_address() is not None


def _fp32_vector(name: str, t: torch.Tensor | None, n: int) -> int | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != (n,):
        raise ValueError(f"{name} must be a contiguous fp32 CPU tensor of shape ({n},), got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t.data_ptr()


def _qweight(name: str, qw: QuantWeight, shape: tuple[int, int], bias: torch.Tensor | None = None) -> _QWeight:
    if tuple(qw.shape) != shape:
        raise ValueError(f"{name} must be {shape}, got {tuple(qw.shape)}")
    m = None if qw.m is None else qw.m.data_ptr()
    return _QWeight(qw.kind, qw.qs.data_ptr(), qw.d.data_ptr(), m, _fp32_vector(f"{name} bias", bias, shape[0]),
                    shape[0], shape[1])


class DecodeStep:
    """The fused decode step of one model over one KV pool (pointers taken once, here: the
    tensors must stay where they are; this object keeps them alive). Raises ValueError on
    inconsistent shapes or dtypes, RuntimeError when `available()` is False."""

    def __init__(self, layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, eps: float,
                 cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
        lib, fn = cpu_ext.library(), cpu_quant.linear_fn_address()
        if lib is None or fn is None:
            raise RuntimeError("the CPU kernels are not available")
        if not layers or heads % kv_heads or heads // kv_heads > _MAX_G or head_dim > _MAX_D or head_dim % 2:
            raise ValueError(f"unsupported shape: {len(layers)} layers, {heads} q heads, {kv_heads} kv heads, "
                             f"head_dim {head_dim}")
        hidden, inter = layers[0].qkv.shape[1], layers[0].down.shape[1]
        q, kv = heads * head_dim, kv_heads * head_dim
        kb = layers[0].k_buffer
        if kb.dtype not in _KV_DTYPES:
            raise ValueError(f"KV pool dtype must be fp32, fp16, bf16, float8_e4m3fn or float8_e5m2, got {kb.dtype}")
        self._keep = (layers, cos_cache, sin_cache)
        self._layers = (_Layer * len(layers))()
        for i, ly in enumerate(layers):
            for name, buf in (("k_buffer", ly.k_buffer), ("v_buffer", ly.v_buffer)):
                if (buf.dtype != kb.dtype or buf.device.type != "cpu" or not buf.is_contiguous()
                        or tuple(buf.shape) != (kb.shape[0], kv_heads, head_dim)):
                    raise ValueError(f"layer {i} {name}: expected contiguous {kb.dtype} "
                                     f"({kb.shape[0]}, {kv_heads}, {head_dim}), got {buf.dtype} {tuple(buf.shape)}")
            self._layers[i] = _Layer(
                _qweight("qkv", ly.qkv, (q + 2 * kv, hidden), ly.qkv_bias), _qweight("o", ly.o, (hidden, q)),
                _qweight("gate_up", ly.gate_up, (2 * inter, hidden)), _qweight("down", ly.down, (hidden, inter)),
                _fp32_vector("in_norm", ly.in_norm, hidden), _fp32_vector("post_norm", ly.post_norm, hidden),
                ly.k_buffer.data_ptr(), ly.v_buffer.data_ptr())
        for name, c in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
            if c.dim() != 2 or c.shape[1] < head_dim or c.dtype != torch.float32 or c.stride(1) != 1:
                raise ValueError(f"{name} must be fp32 (max_pos, >= {head_dim}) with contiguous rows")
        if cos_cache.stride(0) != sin_cache.stride(0):
            raise ValueError("cos_cache and sin_cache must have the same row stride")
        self._model = _Model(ctypes.addressof(self._layers), len(layers), hidden, heads, kv_heads, head_dim, inter,
                             eps, head_dim ** -0.5, cos_cache.data_ptr(), sin_cache.data_ptr(),
                             cos_cache.stride(0), min(cos_cache.shape[0], sin_cache.shape[0]),
                             _KV_DTYPES[kb.dtype], kb.shape[0], fn)
        self._fn = lib.decode_step_f32
        self._model_ptr = ctypes.addressof(self._model)
        self.hidden = hidden
        self.timing = False
        self._timers = torch.zeros(2, dtype=torch.int64)

    @property
    def matmul_ns(self) -> int:
        return int(self._timers[0])

    @property
    def attention_ns(self) -> int:
        return int(self._timers[1])

    def run(self, x: torch.Tensor, positions: torch.Tensor, out_loc: torch.Tensor, req_to_token: torch.Tensor,
            rows: torch.Tensor, seq_lens: torch.Tensor, threads: int, attn_threads: int,
            int_max_m: int) -> torch.Tensor:
        """One step for M = x.shape[0] decode rows. x (M, hidden) fp32 contiguous CPU, the
        embedded tokens, is overwritten with the last layer's output; returns the residual stream
        before it (a new (M, hidden) tensor). positions, out_loc, rows (request rows of the int32
        contiguous req_to_token), seq_lens (keys per row, the new token's included): int64
        contiguous (M,). Writes each layer's K/V at out_loc. Raises ValueError (nothing written)
        on indices out of range or bad tensors, MemoryError when scratch memory runs out."""
        M = x.shape[0]
        if (x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
                or tuple(x.shape) != (M, self.hidden)):
            raise ValueError(f"x must be a contiguous fp32 CPU tensor (M, {self.hidden}), got {x.dtype} "
                             f"{tuple(x.shape)}")
        for name, t in (("positions", positions), ("out_loc", out_loc), ("rows", rows), ("seq_lens", seq_lens)):
            if t.dtype != torch.int64 or t.shape != (M,) or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{name} must be a contiguous int64 CPU tensor of shape ({M},)")
        if req_to_token.dtype != torch.int32 or req_to_token.dim() != 2 or not req_to_token.is_contiguous():
            raise ValueError("req_to_token must be a contiguous 2-D int32 tensor")
        residual = torch.empty_like(x)
        rc = self._fn(self._model_ptr, x.data_ptr(), residual.data_ptr(), M, positions.data_ptr(),
                      out_loc.data_ptr(), req_to_token.data_ptr(), req_to_token.shape[1], req_to_token.shape[0],
                      rows.data_ptr(), seq_lens.data_ptr(), int_max_m, threads, attn_threads,
                      self._timers.data_ptr() if self.timing else None)
        if rc:
            exc, msg = _ERRORS.get(rc, (RuntimeError, f"error {rc}"))
            raise exc(f"fused decode step: {msg}")
        return residual
