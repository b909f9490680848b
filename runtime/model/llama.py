"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a flat, unpadded batch of tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from radixflow.kernels import cpu_ext, cpu_quant
from radixflow.runtime.model import fused_decode
from radixflow.runtime.model.attention.base import AttentionBackend
from radixflow.runtime.model.cpu_gemm import numpy_view_t, openblas_linear
from radixflow.runtime.model.forward_batch import ForwardBatch
from radixflow.runtime.model.model_config import ModelConfig


class Linear(nn.Linear):
    """nn.Linear that can run on quantized weights (cpu_quant; `weight` is then None), on
    radixflow's packed-weight kernel or on numpy's OpenBLAS instead of torch's BLAS (see cpu_gemm)."""

    _wt = None  # (in, out) numpy view of the weight when the OpenBLAS path is on
    _packed = None  # cpu_ext.pack_weight(weight) when the packed path is on
    _qw: cpu_quant.QuantWeight | None = None  # the quantized weight (runtime/model/quant_linear.py)

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint (and torch's init on the meta
        device imports torch._dynamo and Triton, ~150 MB of resident memory for nothing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._qw is not None:
            return cpu_quant.linear(x, self._qw, self.bias)
        if self._packed is not None:
            return cpu_ext.linear_packed(x, self._packed, self.out_features, self.bias)
        if self._wt is not None:
            return openblas_linear(x, self._wt, self.bias)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding without random init (see Linear.reset_parameters)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """`norm(x)`, or `norm(x, residual)` -> (norm(x + residual), x + residual): the residual add
    fused in, as vLLM and SGLang do, so a decoder layer costs one pass instead of two."""

    def __init__(self, dim: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if self.fused:
            from radixflow.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm

            return rmsnorm(x, self.weight, self.eps) if residual is None else \
                fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and cpu_ext.available():
            # One C pass per row; torch's rms_norm on CPU is several ops, each waking the thread pool.
            return cpu_ext.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op; the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Computed in fp32 and cast back, as Hugging Face does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear or Llama 3.1 scaling applied."""
    d = cfg.head_dim
    # On the CPU even under a meta-device context: meta arithmetic imports torch._dynamo and Triton.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / float(sc["factor"])
    # llama3: keep high frequencies, divide low ones by factor, interpolate between.
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) rope with a cos/sin cache indexed by position."""

    def __init__(self, cfg: ModelConfig, max_positions: int, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        inv_freq = rope_inv_freq(cfg)
        t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused path: rotate q (T, Hq, D) and k (T, Hkv, D) with the Triton kernel."""
        from radixflow.kernels.rotary import rotary

        half = q.shape[-1] // 2  # the cache repeats its halves: (max_pos, D) viewed as (max_pos, D/2)
        return rotary(q, k, positions, self.cos_cache[:, :half], self.sin_cache[:, :half])

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (T, 1, D), for `rotate`; computed once per forward, not per layer."""
        cached = self._cos_sin
        if cached is not None and cached[0] is positions and cached[1].dtype == dtype:
            return cached[1], cached[2]
        half = self.cos_cache.shape[-1] // 2
        cos = self.cos_cache[positions].unsqueeze(1).to(dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(dtype)
        sin[..., :half].neg_()  # rotate_half(x) * sin == roll(x, half) * signed_sin
        self._cos_sin = (positions, cos, sin)
        return cos, sin

    def rotate_(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`rotate`, in place on x when the CPU kernel can (fp32 on CPU: one pass instead of
        four ops); returns the rotated tensor (x itself, or a new one)."""
        if x.dtype == torch.float32 and x.device.type == "cpu" and cpu_ext.available():
            return cpu_ext.rope_(x, positions, self.cos_cache, self.sin_cache)
        return self.rotate(positions, x)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (T, heads, D): x * cos + rotate_half(x) * sin, as Hugging Face does."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)

    _cos_sin: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # Fused q/k/v: one matmul instead of three (the weights are concatenated at load).
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding,
                backend: AttentionBackend) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size:].view(T, Hkv, D)
        if rope.fused:
            q = qkv[:, :self.q_size].view(T, H, D)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(T, Hkv, D)
            q, k = rope(batch.positions, q, k)
        else:  # q and k rotated together: one set of elementwise ops instead of two
            qk = rope.rotate_(batch.positions, qkv[:, :self.q_size + self.kv_size].view(T, H + Hkv, D))
            q, k = qk[:, :H], qk[:, H:]
        out = backend.forward(q, k, v, self.layer_id, batch, self.scale)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from radixflow.kernels.activation import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate_up = self.gate_up_proj(x)
        if gate_up.dtype == torch.float32 and gate_up.device.type == "cpu" and cpu_ext.available():
            return self.down_proj(cpu_ext.silu_mul(gate_up))  # one pass instead of three ops
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, fused: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, rope: RotaryEmbedding,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output, not yet added to `residual` (the stream before it; None
        for the first layer). Returns this layer's (output, residual) the same way."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, batch, rope, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """forward(batch) -> final hidden states (T, hidden); `compute_logits` maps rows to vocab.

    `fused_kernels=True` runs rmsnorm, rope and silu-and-mul as Triton kernels (GPU path)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, fused_kernels: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.fused_kernels = fused_kernels
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, fused_kernels) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused_kernels)
        self.rope = RotaryEmbedding(cfg, max_positions, fused_kernels)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        if self._embed_qw is not None:  # quantized: rows dequantized on lookup
            x, residual = cpu_quant.embedding(self._embed_qw, batch.input_ids), None
        else:
            x, residual = self.embed_tokens(batch.input_ids), None
        fused = fused_decode.run_layers(self, batch, backend, x)  # all layers in one C call, when it applies
        if fused is not None:
            x, residual = fused
        else:
            for layer in self.layers:
                x, residual = layer(x, residual, batch, self.rope, backend)
        return self.norm(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> fp32 logits (N, vocab)."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        if self._embed_qw is not None:
            return cpu_quant.linear(hidden.float(), self._embed_qw)
        if self._embed_packed is not None:
            return cpu_ext.linear_packed(hidden, self._embed_packed, self.cfg.vocab_size)
        if self._embed_wt is not None:
            return openblas_linear(hidden, self._embed_wt)
        return F.linear(hidden, self.embed_tokens.weight).float()

    _embed_wt = None  # numpy view of the tied embedding's transpose, on the OpenBLAS path
    _embed_packed = None  # the tied embedding packed for cpu_ext.linear_packed, on the packed path
    _embed_qw: cpu_quant.QuantWeight | None = None  # the quantized embedding (and tied LM head)
    _fused_decode = None  # fused_decode.FusedDecode: the fused CPU decode step's state, built on first use

    def set_gemm_backend(self, name: str) -> None:
        """'packed': every linear (and the tied lm_head) runs on cpu_ext's packed-weight kernel
        (the weights are packed once here, a second copy of them); 'openblas': on numpy's BLAS;
        'torch': on torch's. Call after the weights are loaded and cast; weights that are not
        contiguous fp32 CPU tensors stay on torch."""
        assert name in ("torch", "openblas", "packed"), name

        def pack(w: torch.Tensor | None) -> torch.Tensor | None:
            if w is None or name != "packed" or numpy_view_t(w) is None:
                return None
            return cpu_ext.pack_weight(w.detach())

        def view(w: torch.Tensor | None) -> object:
            return numpy_view_t(w) if w is not None and name == "openblas" else None

        for m in self.modules():  # quantized layers (weight None) keep their kernel
            if isinstance(m, Linear):
                m._wt = view(m.weight)
                m._packed = pack(m.weight)
        self._embed_wt = view(self.embed_tokens.weight)
        self._embed_packed = pack(self.embed_tokens.weight) if self.lm_head is None else None

    def fused_offsets(self) -> dict[str, list[tuple[int, int]]]:
        """(start row, rows) of each shard of the fused layers, by layer name."""
        cfg = self.cfg
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        return {"qkv_proj": [(0, q), (q, kv), (q + kv, kv)], "gate_up_proj": [(0, inter), (inter, inter)]}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors, fusing q/k/v and gate/up; every parameter must be set."""
        params = dict(self.named_parameters())
        offsets = self.fused_offsets()
        loaded: set[str] = set()
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            target, shard = param_target(name)
            if target == "lm_head.weight" and self.lm_head is None:
                continue
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            with torch.no_grad():
                if shard is None:
                    assert param.shape == w.shape, f"{name}: {tuple(w.shape)} vs {tuple(param.shape)}"
                    param.copy_(w)
                    loaded.add(target)
                else:
                    group = target.split(".")[-2]
                    start, size = offsets[group][shard]
                    assert w.shape[0] == size, f"{name}: {tuple(w.shape)}, expected {size} rows"
                    param[start:start + size].copy_(w)
                    loaded.add(f"{target}#{shard}")
        expected = set()
        for pname in params:
            group = pname.split(".")[-2] if "." in pname else ""
            if group in offsets:
                expected.update(f"{pname}#{i}" for i in range(len(offsets[group])))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")


_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def param_target(name: str) -> tuple[str, int | None]:
    """A Hugging Face tensor name -> (our parameter name, shard of the fused layer or None)."""
    parts = name.removeprefix("model.").split(".")
    for i, p in enumerate(parts):
        if p in _FUSED:
            new, shard = _FUSED[p]
            return ".".join(parts[:i] + [new] + parts[i + 1:]), shard
    return ".".join(parts), None
