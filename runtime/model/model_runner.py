"""Loads a model, owns the KV memory, and runs one ForwardBatch to logits."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Iterator

import torch
from safetensors import safe_open

from radixflow.kernels import cpu_ext, cpu_quant
from radixflow.runtime.config import EngineConfig
from radixflow.runtime.loading.default_model import ensure_fp32_weights
from radixflow.runtime.loading.gguf import GGUF_FILE
from radixflow.runtime.model import cpu_gemm
from radixflow.runtime.model.attention.base import AttentionBackend
from radixflow.runtime.model.forward_batch import ForwardBatch
from radixflow.runtime.model.llama import LlamaForCausalLM, RotaryEmbedding
from radixflow.runtime.model.memory_pool import KVPool, ReqToTokenPool, TokenAllocator
from radixflow.runtime.model.model_config import ModelConfig
from radixflow.runtime.model.parallel import protocol
from radixflow.runtime.model.parallel.group import TPGroup, ranks_per_node, start_rank0
from radixflow.runtime.model.parallel.layers import gather_logits, local_logits, shard_model
from radixflow.runtime.model.parallel.sharding import plan_shards, shard_weights
from radixflow.runtime.model.quant_linear import load_quantized, quantize_at_load

logger = logging.getLogger(__name__)

_MAX_DEFAULT_CONTEXT = 32768
_CPU_POOL_CAP_BYTES = 512 << 20  # default KV pool on CPU: at most this (max_total_tokens overrides)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def iter_safetensors(path: str):
    """Yield (name, tensor) for every tensor in the folder's *.safetensors files."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in model folder {path!r}")
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class ModelRunner:
    """Model + KV pools + attention backend. Not thread-safe; the scheduler owns it."""

    def __init__(self, config: EngineConfig, model_path: str, tp: TPGroup | None = None) -> None:
        """Load the model. At config.tp_size > 1, rank 0 (tp None) starts the other ranks and
        joins their group; a worker passes its own `tp`. Every rank then holds its shard."""
        t0 = time.perf_counter()
        self.config = config
        self.model_path = model_path
        self.model_config = mc = ModelConfig.from_folder(model_path)
        # Checked before any process starts: a model the ranks cannot split is a ValueError.
        self.plan = None if config.tp_size == 1 else plan_shards(mc, config.tp_size, tp.rank if tp else 0)
        self.tp = tp if tp is not None or self.plan is None else start_rank0(config, model_path)
        self.sender: protocol.Sender | None = None
        try:
            if self.tp is None:
                self._load(config, mc)
            else:
                with self.tp.loading_together():
                    self._load(config, mc)
        except BaseException:
            if self.tp is not None and self.tp.rank == 0:
                self.tp.destroy()
                self._restore_threads()
            raise
        if self.tp is not None and self.tp.rank == 0:
            self.sender = protocol.Sender(self.tp)
        logger.info("model loaded in %.2fs: %s, %d KV slots (%s), context %d, %s on %s, %s GEMMs, weights %s%s",
                    time.perf_counter() - t0, mc.architecture, self.num_slots, self.kv_dtype, self.context_length,
                    self.dtype, self.device, self.gemm_backend, self.quantization,
                    f", tensor parallel rank {self.tp.rank} of {self.tp.size}" if self.tp else "")

    def _load(self, config: EngineConfig, mc: ModelConfig) -> None:
        self.device = self.tp.device if self.tp is not None else config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.kv_dtype = _kv_dtype(config.kv_cache_dtype, self.device, self.dtype)
        threads = config.num_threads
        if threads is None and self.tp is not None and self.device.type == "cpu":
            # A node's cores are shared by its ranks (more threads than cores: each all-reduce waits
            # for a descheduled rank). Rank 0's own setting comes back at close().
            self._threads_before = torch.get_num_threads()
            threads = max(1, len(os.sched_getaffinity(0)) // ranks_per_node(config))
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        local = self.plan.local_config(mc) if self.plan is not None else mc  # this rank's shard
        ctx = config.context_length or min(mc.max_position_embeddings, _MAX_DEFAULT_CONTEXT)
        ctx = _within_sliding_window(ctx, mc.sliding_window, explicit=config.context_length is not None)
        self.num_slots = self._pool_size(local, ctx)
        self.context_length = min(ctx, self.num_slots)
        if self.tp is not None:  # rank 0 decides the pool for all: every rank stores the same slots
            self.num_slots, self.context_length = self.tp.share_ints([self.num_slots, self.context_length])

        backend = config.resolved_attention_backend()
        fused = backend == "triton"  # the Triton path also fuses norm, rope and activation
        self.quantization = self._choose_quantization(config.quantization)
        with torch.device("meta"):
            model = LlamaForCausalLM(local, max_positions=1, fused_kernels=fused)
            if self.plan is not None:
                shard_model(model, self.plan, self.tp)
        if self.quantization == "none":
            model = model.to_empty(device=self.device)
            model.load_weights(self._shard(iter_safetensors(ensure_fp32_weights(self.model_path))))
        else:
            load_quantized(model, self._shard(self._quantized_weights(mc)), self.device)
        self.model = model.to(self.dtype).eval()
        # The rope cache is a buffer: build it for real after the cast, so it stays fp32.
        self.model.rope = RotaryEmbedding(mc, self.context_length, fused).to(self.device)
        self.gemm_backend = self._choose_gemm(config.cpu_gemm)
        self.model.set_gemm_backend(self.gemm_backend)

        self.req_to_token_pool = ReqToTokenPool(config.max_running_requests + 1, self.context_length,
                                                self.device)
        self.kv_pool = KVPool(self.num_slots, mc.num_layers, local.num_kv_heads, mc.head_dim,
                              self.kv_dtype, self.device)
        self.allocator = TokenAllocator(self.num_slots)
        self.attn_backend = self._make_backend(backend)

    def _shard(self, weights):
        """The checkpoint's tensors, cut to this rank's part at tp_size > 1."""
        return weights if self.plan is None else shard_weights(weights, self.plan)

    def _choose_quantization(self, pref: str) -> str:
        """'none', 'gguf', 'int8' or 'int4': auto runs a folder converted from a GGUF on the
        GGUF's own blocks when the quantized kernels build (CPU, fp32 activations), else fp32."""
        gguf = os.path.isfile(os.path.join(self.model_path, GGUF_FILE))
        usable = self.device.type == "cpu" and self.dtype == torch.float32
        if pref == "auto":
            return "gguf" if gguf and usable and cpu_quant.available() else "none"
        if pref == "none":
            return pref
        if not usable or not cpu_quant.available():
            raise ValueError(f"quantization={pref!r} needs the CPU, fp32 activations and radixflow's quantized "
                             "kernels (a C compiler; RADIXFLOW_DISABLE_CPU_EXT unset)")
        if pref == "gguf" and not gguf:
            raise ValueError(f"quantization='gguf': {self.model_path} was not converted from a GGUF file")
        return pref

    def _quantized_weights(self, mc: ModelConfig):
        if self.quantization == "gguf":
            from radixflow.runtime.loading.gguf_quant import iter_gguf_weights

            return iter_gguf_weights(os.path.join(self.model_path, GGUF_FILE), mc.num_heads, mc.num_kv_heads)
        return quantize_at_load(iter_safetensors(ensure_fp32_weights(self.model_path)), self.quantization)

    def _choose_gemm(self, pref: str) -> str:
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return "torch"
        if pref == "packed" and not cpu_ext.available():
            raise ValueError("cpu_gemm='packed' needs radixflow's CPU kernels, which could not be built "
                             "(no C compiler, or RADIXFLOW_DISABLE_CPU_EXT=1)")
        if pref != "auto":
            return pref
        if cpu_ext.available():
            return "packed"
        mlp = self.model.layers[0].mlp.gate_up_proj.weight  # the largest per-layer weight
        if mlp is None:  # quantized: no fp32 linear left to run
            return "torch"
        return cpu_gemm.probe(mlp)

    def _pool_size(self, mc: ModelConfig, ctx: int) -> int:
        per_token = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.kv_dtype)
        if self.config.max_total_tokens is not None:
            return self.config.max_total_tokens
        budget = int(_available_memory(self.device) * self.config.mem_fraction)
        if self.device.type == "cpu":  # a server on a laptop or a small VM: the pool is the largest allocation
            budget = min(budget, _CPU_POOL_CAP_BYTES)
        budget //= per_token
        return max(64, min(budget, self.config.max_running_requests * ctx))

    def _make_backend(self, name: str) -> AttentionBackend:
        if name == "torch":
            from radixflow.runtime.model.attention.torch_backend import TorchAttnBackend
            # OpenBLAS's threads spin after each matmul; the attention kernel's pool worker would
            # fight them for a core (70 ms per token at batch 1), so it runs on the caller alone.
            threads = 1 if self.gemm_backend == "openblas" else None
            return TorchAttnBackend(self.kv_pool, self.req_to_token_pool, kernel_threads=threads)
        if name == "triton":
            from radixflow.runtime.model.attention.triton_backend import TritonAttnBackend
            return TritonAttnBackend(self.kv_pool, self.req_to_token_pool)
        raise ValueError(f"unknown attention backend {name!r}")

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the batch. Returns (fp32 logits of each request's last new token (B, V), the final
        hidden states of every new token (T, hidden) if batch.return_all_logits else None).
        Hidden states, not logits, so that input logprobs cost vocab-wide memory only for the
        rows that ask for them. At tp_size > 1 rank 0 sends the batch to the other ranks first;
        their logits are None (their share went to rank 0)."""
        if self.tp is not None:
            return self._forward_parallel(batch)
        self.attn_backend.init_forward_metadata(batch)
        hidden = self.model(batch, self.attn_backend)
        last_rows = batch.extend_start_loc + batch.extend_lens - 1
        logits = self.model.compute_logits(hidden[last_rows])
        return logits, (hidden if batch.return_all_logits else None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows (N, hidden) -> fp32 logits (N, V) (input logprobs). At tp_size > 1 every
        rank computes its vocabulary share (rank 0 sends the rows first), rank 0 gathers them."""
        if self.tp is None:
            return self.model.compute_logits(hidden)
        with self._command(protocol.pack_logits(hidden) if self.sender is not None else None):
            return self._gathered_logits(hidden)

    def close(self) -> None:
        """Stop the other ranks and leave their group (rank 0 at tp_size > 1; idempotent)."""
        if self.sender is None or self.tp is None:
            return
        sender, self.sender = self.sender, None
        sender.stop()
        # A step stuck in a collective holds the lock until dist_timeout: then the workers are
        # killed without the message.
        if sender.lock.acquire(timeout=5.0):
            try:
                sender.send([protocol.SHUTDOWN] + [0] * (protocol.HEADER_LEN - 1))
            except Exception as e:  # a rank already gone: it is stopped below all the same
                logger.warning("could not tell the tensor-parallel ranks to stop: %s", e)
            finally:
                sender.lock.release()
        self.tp.destroy()
        self._closed = True
        self._restore_threads()

    def _restore_threads(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    _closed = False
    _threads_before: int | None = None

    @contextlib.contextmanager
    def _command(self, message: tuple[list[int], torch.Tensor] | None) -> Iterator[None]:
        """Rank 0: hold the command lock, send `message`, run the body (its collectives). Other
        ranks: just the body (the message already came)."""
        if self._closed:
            raise RuntimeError("the model runner is closed")
        if self.sender is None:
            yield
            return
        with self.sender.lock:
            assert message is not None
            self.sender.send(*message)
            yield

    def _forward_parallel(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._command(protocol.pack_forward(batch, self.req_to_token_pool) if self.sender else None):
            self.attn_backend.init_forward_metadata(batch)
            hidden = self.model(batch, self.attn_backend)
            logits = self._gathered_logits(hidden[batch.extend_start_loc + batch.extend_lens - 1])
        return logits, (hidden if batch.return_all_logits else None)

    def _gathered_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.plan is not None and self.tp is not None
        return gather_logits(local_logits(self.model, hidden), self.plan, self.vocab_size, self.tp)


_KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # fp8: saturating casts, no scale


def _kv_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype: auto = fp16 on CPU (half of fp32; the CPU attention kernel reads it in
    place and computes in fp32), the model's dtype elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cpu" else dtype
    return _KV_DTYPES[name]


def _within_sliding_window(ctx: int, window: int | None, explicit: bool) -> int:
    """The context length, capped at the model's sliding attention window: the engine attends to
    every earlier token, which equals sliding-window attention exactly while no sequence is
    longer than the window. An explicit context_length beyond the window is refused."""
    if window is None or window >= ctx:
        return ctx
    if explicit:
        raise ValueError(f"context_length {ctx} exceeds this model's sliding attention window ({window} tokens): "
                         "sliding-window attention is not implemented, so sequences are limited to the window")
    logger.warning("this model attends within a sliding window of %d tokens; the context length is limited "
                   "to %d (sliding-window attention beyond it is not implemented)", window, window)
    return window
