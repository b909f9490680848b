"""The fused CPU decode step of a Llama-family model: when it applies, and its pointer table.

At batch 1 a decode step of the Python path makes ~330 calls into torch and the kernels (module
calls, allocations, ctypes) for ~150 matmuls and attention calls; kernels/cpu_decode_step.py runs
all decoder layers in one C call on the same kernels, bitwise the Python path's results when that
path attends with the in-place C kernel (a cascade over a shared prefix rounds differently). It
applies when:
  - RADIXFLOW_FUSED_DECODE is not "0" (read at every step: benchmarks compare both in one run);
  - the batch is DECODE, its activations fp32 on the CPU, with fewer than MAX_ROWS rows or rows
    that share no prefix (no two start at the same KV slot): bigger batches that do share one keep
    the Python path, whose attention reads a shared prefix once (the cascade);
  - every linear of every layer is quantized (`_qw`) and not tensor-parallel (no `tp`), the model
    runs neither the Triton kernels nor fused rope;
  - the attention backend is the torch one reading K/V in place with the C kernel (a pool of any
    dtype that kernel reads: fp32, fp16, bf16, fp8 e4m3 / e5m2).
The embedding, the final norm and the LM head stay with the model. The pointer table is built on
the first step that applies and kept on the model (`_fused_decode`) until the backend or the rope
cache changes.
"""

from __future__ import annotations

import os

import torch

from radixflow.kernels import cpu_decode_step, cpu_quant
from radixflow.kernels.cpu_decode_step import DecodeStep, LayerWeights
from radixflow.runtime.model.attention.base import AttentionBackend
from radixflow.runtime.model.attention.torch_backend import TorchAttnBackend
from radixflow.runtime.model.forward_batch import ForwardBatch, ForwardMode

ENV = "RADIXFLOW_FUSED_DECODE"
MAX_ROWS = 8  # decode batches below this many rows take the fused step even when they share a prefix


class FusedDecode:
    """A model's fused step for one backend and rope cache (None: the model does not qualify,
    `reason` says why), and how many steps took it."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend) -> None:
        self.backend = backend
        self.rope = model.rope
        self.steps = 0
        self.reason = _unfit(model, backend)
        self.step: DecodeStep | None = None
        if self.reason is None:
            try:
                self.step = _build(model, backend)
            except ValueError as e:  # a shape or dtype the C step does not take: the Python path runs
                self.reason = str(e)
            else:
                backend.lazy_decode_rows = MAX_ROWS  # the step needs no decode plan


def enabled() -> bool:
    """The switch: on unless RADIXFLOW_FUSED_DECODE=0."""
    return os.environ.get(ENV, "1") != "0"


def state(model: torch.nn.Module, backend: AttentionBackend) -> FusedDecode:
    """The model's FusedDecode for `backend`, built on first use and kept on the model."""
    fd = model._fused_decode
    if fd is None or fd.backend is not backend or fd.rope is not model.rope:
        fd = model._fused_decode = FusedDecode(model, backend)
    return fd


def run_layers(model: torch.nn.Module, batch: ForwardBatch, backend: AttentionBackend,
               x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every decoder layer on x (T, hidden), the embedded tokens, by the fused step: (the last
    layer's output, the residual stream before it), x overwritten; or None when the step does not
    apply (nothing done: the caller runs the layers)."""
    if batch.mode is not ForwardMode.DECODE or not enabled():
        return None
    M = x.shape[0]
    if M == 0 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    fd = state(model, backend)
    if fd.step is None or (M >= MAX_ROWS and _share_a_prefix(batch, backend)):
        return None
    threads = torch.get_num_threads()
    r2t = backend.req_to_token_pool.req_to_token
    residual = fd.step.run(x, batch.positions, batch.out_cache_loc, r2t, batch.req_pool_indices, batch.seq_lens,
                           threads, backend.kernel_threads or threads, cpu_quant.INT_MAX_M)
    fd.steps += 1
    return x, residual


def _share_a_prefix(batch: ForwardBatch, backend: AttentionBackend) -> bool:
    """Whether two of the batch's requests start at the same KV slot: the radix cache gave them a
    shared prefix (the cascade's cheap test too: unrelated prompts never share a first slot)."""
    firsts = backend.req_to_token_pool.req_to_token[batch.req_pool_indices, 0].tolist()
    return len(set(firsts)) < len(firsts)


def _unfit(model: torch.nn.Module, backend: AttentionBackend) -> str | None:
    """Why the model and backend cannot take the fused step, or None."""
    if not cpu_decode_step.available():
        return "the CPU kernels are not available"
    if model.fused_kernels or model.rope.fused:
        return "the model runs the Triton kernels"
    if not isinstance(backend, TorchAttnBackend) or not backend.use_cpu_kernel:
        return "the attention backend does not read K/V in place with the C kernel"
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if lin._qw is None:
                return "a linear layer is not quantized"
            if hasattr(lin, "tp"):
                return "tensor-parallel layers"
            if lin.bias is not None and lin is not attn.qkv_proj:
                return "a bias outside q/k/v"
    return None


def _build(model: torch.nn.Module, backend: AttentionBackend) -> DecodeStep:
    pool = backend.kv_pool
    layers = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(LayerWeights(attn.qkv_proj._qw, attn.qkv_proj.bias, attn.o_proj._qw, mlp.gate_up_proj._qw,
                                   mlp.down_proj._qw, layer.input_layernorm.weight.detach(),
                                   layer.post_attention_layernorm.weight.detach(), pool.k_buffer[i],
                                   pool.v_buffer[i]))
    attn, norm = model.layers[0].self_attn, model.layers[0].input_layernorm
    return DecodeStep(layers, attn.num_heads, attn.num_kv_heads, attn.head_dim, norm.eps,
                      model.rope.cos_cache, model.rope.sin_cache)
