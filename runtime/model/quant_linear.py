"""Loading a Llama model with quantized weights: GGUF blocks as they are, or an fp checkpoint
quantized at load (weight-only int8 / int4, per group of 32).

Every linear layer (fused q/k/v and gate/up included), the embedding and the LM head get a
`cpu_quant.QuantWeight`; their fp32 parameters are dropped before the model is materialized, so no
fp32 copy of a quantized weight ever exists. Norms stay fp32.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable

import torch

from radixflow.kernels import cpu_quant
from radixflow.kernels.cpu_quant import QuantBlocks
from radixflow.runtime.model.llama import Linear, LlamaForCausalLM, param_target

logger = logging.getLogger(__name__)


def quantize_at_load(weights: Iterable[tuple[str, torch.Tensor]],
                     scheme: str) -> Iterable[tuple[str, torch.Tensor | QuantBlocks]]:
    """2-D weights whose K is a multiple of 32 quantized with `scheme` ('int8' | 'int4'); others as is."""
    for name, w in weights:
        if w.dim() == 2 and w.shape[1] % cpu_quant.QK == 0 and "norm" not in name:
            yield name, cpu_quant.blocks_of(cpu_quant.quantize(w, scheme))
        else:
            yield name, w


def load_quantized(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor | QuantBlocks]],
                   device: torch.device) -> int:
    """Load `weights` into `model`, built on the meta device: QuantBlocks become QuantWeights of
    the linear layers / embedding / LM head they name (shards of a fused layer joined in order),
    fp tensors go through `model.load_weights`. Materializes the model on `device` (CPU) and
    returns the bytes the quantized weights take. Raises ValueError on an unknown or missing
    tensor, or a quantized tensor that is not a matmul weight."""
    fp: list[tuple[str, torch.Tensor]] = []
    shards: dict[str, dict[int, QuantBlocks]] = {}
    total = 0
    for name, w in weights:
        if not isinstance(w, QuantBlocks):
            fp.append((name, w))
            continue
        target, shard = param_target(name)
        if target == "lm_head.weight" and model.lm_head is None:
            continue  # tied: the embedding serves as the LM head
        parts = shards.setdefault(target, {})
        parts[0 if shard is None else shard] = w
        if len(parts) == len(model.fused_offsets().get(target.split(".")[-2], [None])):
            total += _attach(model, target, parts)
            del shards[target]  # packed: the unpacked quants can be freed now
    if shards:
        raise ValueError(f"missing shards of fused layers: {sorted(shards)[:3]}")
    w = parts = None  # noqa: F841  (the last blocks: freed before the trim below)
    model.to_empty(device=device)
    model.load_weights(fp)
    _release_freed_memory()
    logger.info("quantized weights: %.1f MB", total / 1e6)
    return total


def _attach(model: LlamaForCausalLM, target: str, parts: dict[int, QuantBlocks]) -> int:
    """Pack the shards of `target` into the QuantWeight of its module, drop the fp32 parameter;
    returns the packed bytes."""
    module = model.get_submodule(target.rsplit(".", 1)[0])
    if not target.endswith(".weight") or not isinstance(module, (Linear, torch.nn.Embedding)):
        raise ValueError(f"quantized tensor {target!r} is not the weight of a linear layer or embedding")
    if sorted(parts) != list(range(len(parts))):
        raise ValueError(f"{target}: got shards {sorted(parts)}")
    qw = cpu_quant.concat([parts[i] for i in range(len(parts))]).pack()
    if qw.shape != tuple(module.weight.shape):
        raise ValueError(f"{target}: quantized shape {qw.shape}, expected {tuple(module.weight.shape)}")
    module.register_parameter("weight", None)
    if isinstance(module, Linear) or hasattr(module, "_qw"):  # a tensor-parallel embedding holds its own rows
        module._qw = qw
    else:
        model._embed_qw = qw
    return qw.nbytes


def _release_freed_memory() -> None:
    """Hand the loader's freed scratch (unpacked quants, fp32 norms read from the file) back to
    the OS: glibc keeps freed heap pages resident otherwise (about 140 MB here)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
