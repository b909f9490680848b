"""GGUF files: metadata, our own numpy dequantizers, and conversion to a Hugging Face folder.

`GGUFReader` (from the `gguf` package) only parses the container; the block formats are decoded
here. `convert_gguf_to_hf` turns a Llama-architecture GGUF into a Hugging Face-style folder:
config.json, generation_config.json, tokenizer.json and tokenizer_config.json (the tokenizer from
`gguf_tokenizer.build_tokenizer`), and model.gguf, the source file itself (a hard link when the
file system allows), whose blocks radixflow runs quantized (loading/gguf_quant.py). The fp32
copy, model.safetensors (HF names, HF Q/K order), is a separate step, `write_fp32_weights`: only
`quantization="none"` / "int8" / "int4" and transformers need it, and
`default_model.ensure_fp32_weights` writes it on first use. Nothing here needs transformers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

from radixflow.runtime.loading.gguf_tokenizer import build_tokenizer

__all__ = [
    "dequantize",
    "permute_qk",
    "unpermute_qk",
    "read_metadata",
    "convert_gguf_to_hf",
    "write_fp32_weights",
    "GGUF_FILE",
    "FP32_FILE",
]

GGUF_FILE = "model.gguf"  # the source file, inside a converted folder: radixflow runs its blocks quantized
FP32_FILE = "model.safetensors"  # the fp32 copy, written on demand (default_model.ensure_fp32_weights)

# ---------------------------------------------------------------------------------------------
# Dequantization. Every function maps flat raw bytes (uint8) to a flat float32 array.
# Block layouts are ggml's (ggml-common.h): fp16 scale `d` (and min `m`), packed quants.


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of each block, as a (n_blocks, 1) float32 column."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high are 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits; bit k belongs to element k."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _q4_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 18)
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return (_f16(b, 0) * q.astype(np.float32)).reshape(-1)


def _q4_1(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 20)
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (_f16(b, 0) * q + _f16(b, 2)).reshape(-1)


def _q5_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 22)
    q = (_nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return (_f16(b, 0) * q.astype(np.float32)).reshape(-1)


def _q5_1(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 24)
    q = (_nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << np.uint8(4))).astype(np.float32)
    return (_f16(b, 0) * q + _f16(b, 2)).reshape(-1)


def _q8_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 34)
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return (q * _f16(b, 0)).reshape(-1)


def _f32(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float32)


def _f16_flat(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


_DEQUANTIZERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: _f32,
    QT.F16: _f16_flat,
    QT.BF16: _bf16,
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.Q8_0: _q8_0,
}


def dequantize(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the raw bytes of one tensor into a float32 array of numpy `shape`.

    `raw` holds exactly the tensor's bytes (any dtype/shape; it is reinterpreted as bytes).
    F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are decoded here; other types (K-quants,
    IQ-quants) fall back to `gguf.quants.dequantize`. Raises ValueError if sizes disagree.
    """
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n = int(np.prod(shape, dtype=np.int64))
    fn = _DEQUANTIZERS.get(qtype)
    if fn is not None:
        out = fn(data)
    else:
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.quants import dequantize as gguf_dequantize

        _, type_size = GGML_QUANT_SIZES[qtype]
        out = gguf_dequantize(data.reshape(-1, type_size), qtype).reshape(-1)
    if out.size != n:
        raise ValueError(f"{qtype.name} tensor of shape {shape}: decoded {out.size} values, expected {n}")
    return out.astype(np.float32, copy=False).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Q/K row order. llama.cpp's converter interleaves the two rotary halves of every head; undo it.


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF row order -> Hugging Face row order for attn_q (n_head = heads) or attn_k (kv heads) weights/biases."""
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face row order -> GGUF row order (what llama.cpp's converter does); inverse of unpermute_qk."""
    d = w.shape[0]
    return w.reshape(n_head, 2, d // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Metadata


def _field_value(field: Any) -> Any:
    """A reader field's value as plain Python (str, int, float, bool, or list of them)."""
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def read_metadata(reader_or_path: GGUFReader | str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (arrays become lists)."""
    reader = reader_or_path if isinstance(reader_or_path, GGUFReader) else GGUFReader(reader_or_path)
    return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------
# Conversion

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face Llama name of a GGUF tensor; ValueError for names that have none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"no Hugging Face Llama equivalent for GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _f32_value(x: float) -> float:
    """The shortest decimal that round-trips the float32 value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> dict[str, Any]:
    """A transformers LlamaConfig dict from GGUF `llama.*` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUF files are supported, this one is {arch!r}")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"llama.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return v

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rope_dim}, head dim {head_dim}) unsupported")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32_value(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise ValueError(f"unsupported rope scaling {scaling!r}")
    return config


def _hf_config(reader: GGUFReader, meta: dict[str, Any], gguf_path: str | os.PathLike) -> dict[str, Any]:
    """The transformers config of a Llama GGUF; ValueError for files conversion does not support."""
    tensors = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF has rope_freqs (Llama 3.1-style rope scaling): not supported by conversion")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")
    vocab_size = int(embd.shape[-1])  # ne order: (hidden, vocab)
    config = llama_config(meta, vocab_size, tied="output.weight" not in tensors)
    config["attention_bias"] = any(name.endswith("attn_q.bias") for name in tensors)
    return config


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> None:
    """Write a Hugging Face-style Llama folder for a Llama GGUF into `out_dir` (created if missing):
    config, generation config, tokenizer and model.gguf, but no fp32 weights (see
    `write_fp32_weights`; transformers needs them, radixflow runs model.gguf).

    `tie_word_embeddings` is true when the file has no `output.weight`. Not atomic: callers that
    share the folder write into a temporary one and rename it (see default_model). Raises
    ValueError for non-Llama files or tensors without a Llama equivalent. `progress` is unused
    (nothing slow is left here) and kept for callers.
    """
    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    config = _hf_config(reader, meta, gguf_path)
    for t in reader.tensors:
        hf_tensor_name(t.name)  # every tensor must have a Llama name, as write_fp32_weights needs
    tok, tok_config = build_tokenizer(meta)
    gen_config = _generation_config(meta, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _link_or_copy(Path(gguf_path), out / GGUF_FILE)
    tok.save(str(out / "tokenizer.json"))
    for name, obj in [
        ("config.json", config),
        ("generation_config.json", gen_config),
        ("tokenizer_config.json", tok_config),
    ]:
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_fp32_weights(gguf_path: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> None:
    """Write every tensor of a Llama GGUF, dequantized to fp32 under its HF name in HF Q/K row
    order, to the safetensors file `dest` (lm_head only when the file has `output.weight`).

    Not atomic: `default_model.ensure_fp32_weights` writes under a temporary name and renames.
    Raises ValueError as `convert_gguf_to_hf` does.
    """
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    config = _hf_config(reader, read_metadata(reader), gguf_path)
    weights = _hf_weights(reader, config["num_attention_heads"], config["num_key_value_heads"], progress)
    save_file(weights, str(dest), metadata={"format": "pt"})


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def _hf_weights(reader: GGUFReader, heads: int, kv_heads: int, progress: bool) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized to fp32, under its HF name, in HF Q/K row order."""
    from tqdm import tqdm

    weights: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne (innermost first)
        w = dequantize(t.data, QT(t.tensor_type), shape)
        name = hf_tensor_name(t.name)
        if t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, heads)
        elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, kv_heads)
        weights[name] = np.ascontiguousarray(w)
    return weights


def _generation_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: generation stops at eos and at the end-of-turn / end-of-message
    tokens when the file names them."""
    stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
        "pad_token_id": config["pad_token_id"],
    }
