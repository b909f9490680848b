"""Triton kernels for the CUDA path, each a thin checked wrapper with a PyTorch reference.

  extend_attention.extend_attention   prefill attention over the paged KV pool (ragged batch)
  decode_attention.decode_attention   flash-decoding attention, one query per request
  store_kv.store_kv                   write new K/V rows into the pool
  rmsnorm.rmsnorm / fused_add_rmsnorm Llama RMSNorm, optionally fused with the residual add
  rotary.rotary                       Llama rope on q/k (tables: rope_cache.build_rope_cache)
  activation.silu_and_mul             SwiGLU: silu(gate) * up

`cpu_ext` holds C kernels for the CPU path (paged decode attention reading the KV pool in
place), compiled on first use with the system's C compiler; without one, callers keep PyTorch.
`reference` and `rope_cache` are pure PyTorch. The kernel modules import Triton; on CPU they
run only under the Triton interpreter, which must be chosen (TRITON_INTERPRET=1) before a
kernel module is first imported. This package imports nothing eagerly.
"""
