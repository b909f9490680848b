"""GGUF files: metadata, our own numpy dequantizers, and conversion to a Hugging Face folder.

`GGUFReader` (from the `gguf` package) only parses the container; the block formats are decoded
here. `convert_gguf_to_hf` turns a Llama-architecture GGUF into a folder that both radixflow and
transformers load: config.json, generation_config.json, model.safetensors (fp32, HF names),
tokenizer.json and tokenizer_config.json. Nothing here needs transformers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

__all__ = [
    "dequantize",
    "permute_qk",
    "unpermute_qk",
    "read_metadata",
    "build_tokenizer",
    "convert_gguf_to_hf",
]

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
# Tokenizer (byte-level BPE "gpt2" and sentencepiece-style "llama" vocabularies)

_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits, as llama.cpp applies them for each `tokenizer.ggml.pre` value.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}
# These split every numeric code point off first, then apply the GPT-2 regex.
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "tekken"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two vocabulary
    pieces, best score first (the order sentencepiece's BPE applies them)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A `tokenizers.Tokenizer` and a tokenizer_config dict from GGUF tokenizer metadata.

    Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE; the pre-tokenizer follows
    `tokenizer.ggml.pre` the way llama.cpp does) and "llama" (sentencepiece BPE with byte
    fallback). Control tokens become special added tokens, user-defined ones plain added tokens.
    BOS/EOS insertion is baked into the post-processor per `add_bos_token`/`add_eos_token`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    kind = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture", "llama")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre", "default")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if kind == "gpt2":
        alphabet = set(_bytes_to_unicode().values())
        spell = _bytes_to_unicode()
        for i, t in enumerate(tokens):  # a normal token outside the byte alphabet is raw text: respell it
            if types[i] not in (_CONTROL, _USER_DEFINED) and not set(t) <= alphabet:
                tokens[i] = "".join(spell[b] for b in t.encode("utf-8"))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
        tok = Tokenizer(BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
        if pre in _SPLIT_BY_PRE:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif pre in _DIGITS_FIRST:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(meta["tokenizer.ggml.scores"])
        if "tokenizer.ggml.merges" in meta:
            merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        else:
            merges = _merges_from_scores(tokens, scores)
        vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", "\u2581")]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")

    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if add_eos and eos is not None else []
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join([*head, "$A", *tail]),
        pair=" ".join([*head, "$A", *tail, *[f"{t}:1" for t in head], "$B:1", *[f"{t}:1" for t in tail]]),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(head + tail)],
    )

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": k == _CONTROL,
            }
            for i, (t, k) in enumerate(zip(tokens, types, strict=True))
            if k in (_CONTROL, _USER_DEFINED)
        },
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


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


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> None:
    """Write a Hugging Face-style Llama folder for a Llama GGUF into `out_dir` (created if missing).

    Weights are dequantized to fp32 with HF names and HF Q/K row order; lm_head is written only
    when the file has `output.weight` (else `tie_word_embeddings` is true). Not atomic: callers
    that share the folder write into a temporary one and rename it (see default_model).
    Raises ValueError for non-Llama files or tensors without a Llama equivalent.
    """
    from safetensors.numpy import save_file
    from tqdm import tqdm

    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF has rope_freqs (Llama 3.1-style rope scaling): not supported by conversion")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")
    embd = tensors["token_embd.weight"]
    vocab_size = int(embd.shape[-1])  # ne order: (hidden, vocab)
    tied = "output.weight" not in tensors
    config = llama_config(meta, vocab_size, tied)
    config["attention_bias"] = any(name.endswith("attn_q.bias") for name in tensors)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

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

    tok, tok_config = build_tokenizer(meta)
    # generation stops at eos and at the end-of-turn / end-of-message tokens when the file names them
    stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    gen_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
        "pad_token_id": config["pad_token_id"],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    for name, obj in [
        ("config.json", config),
        ("generation_config.json", gen_config),
        ("tokenizer_config.json", tok_config),
    ]:
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
