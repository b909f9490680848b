"""One frozen, validated configuration for the engine and the server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from radixflow.grammars.selection import GRAMMAR_BACKENDS

GEMM_BACKENDS = ("auto", "torch", "openblas", "packed")
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2")
SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the scheduler and model runner need. `model=None` means the default model.

    KV pool size: `max_total_tokens` if set, else `mem_fraction` of free device memory (of
    RAM on CPU, and at most 512 MiB there), capped by `max_running_requests * context_length`.
    """

    model: str | None = None
    tokenizer: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    max_total_tokens: int | None = None
    mem_fraction: float = 0.1
    max_running_requests: int = 64
    context_length: int | None = None  # default: the model's max_position_embeddings, capped
    max_prefill_tokens: int = 4096
    chunked_prefill_size: int = 1024  # <= 0 disables chunking
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    attention_backend: str = "auto"
    disable_cuda_graph: bool = False
    grammar_compile_timeout: float = 30.0
    # xgrammar | llguidance | auto (per request: the backend that enforces the spec exactly, xgrammar first)
    grammar_backend: str = "auto"
    disable_jump_forward: bool = False
    disable_mixed_batch: bool = False  # True: prefill steps and decode steps alternate, never share a forward
    num_threads: int | None = None  # torch CPU threads; None = leave as is (tp_size > 1: the cores / ranks per node)
    cpu_gemm: str = "auto"  # fp32 CPU matmuls: auto | torch | openblas | packed (see runtime/cpu_gemm.py)
    # CPU weights: auto (a GGUF-converted model runs on its own 4/8-bit blocks, others fp32) | none (fp32)
    # | gguf | int8 | int4 (weight-only, per group of 32, quantized at load); see runtime/model/quant_linear.py
    quantization: str = "auto"
    # auto = float16 on CPU, the model dtype on CUDA | float32 | float16 | bfloat16 | fp8_e4m3 | fp8_e5m2
    kv_cache_dtype: str = "auto"
    random_seed: int = 0
    stream_interval: int = 1
    # An idle in-process Engine that starts receiving requests waits for each next one while they
    # keep coming less than this apart (and less than a tenth of a step; 50 such gaps in all),
    # so a burst from many threads starts as one batch. 0 turns it off.
    arrival_gap_ms: float = 10.0
    # Tensor parallelism (runtime/model/parallel/): the model split over tp_size ranks, one process
    # each (gloo on CPU, NCCL on GPUs), nnodes machines; a node with node_rank > 0 runs only its
    # ranks. dist_init_addr HOST:PORT: where the ranks meet (needed with nnodes > 1; default: a free
    # local port). dist_timeout: seconds any wait on another rank may take before it fails.
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    dist_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise ValueError(f"grammar_backend must be one of {GRAMMAR_BACKENDS}, got {self.grammar_backend!r}")
        if self.cpu_gemm not in GEMM_BACKENDS:
            raise ValueError(f"cpu_gemm must be one of {GEMM_BACKENDS}, got {self.cpu_gemm!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.mem_fraction <= 1:
            raise ValueError(f"mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError(f"max_total_tokens must be >= 16, got {self.max_total_tokens}")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.max_prefill_tokens < 16:
            raise ValueError("max_prefill_tokens must be >= 16")
        if self.arrival_gap_ms < 0:
            raise ValueError(f"arrival_gap_ms must be >= 0, got {self.arrival_gap_ms}")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        self._check_parallel()

    def _check_parallel(self) -> None:
        for name in ("tp_size", "nnodes", "node_rank"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.nnodes < 1 or self.tp_size % self.nnodes:
            raise ValueError(f"nnodes must be >= 1 and divide tp_size {self.tp_size}, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ValueError("nnodes > 1 needs dist_init_addr HOST:PORT (rank 0's node, reachable from every node)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be HOST:PORT, got {self.dist_init_addr!r}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0, got {self.dist_timeout}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        dt = DTYPES[self.dtype]
        if dt is None:
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return dt

    def resolved_attention_backend(self) -> str:
        if self.attention_backend == "auto":
            return "triton" if self.resolved_device().type == "cuda" else "torch"
        return self.attention_backend

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
