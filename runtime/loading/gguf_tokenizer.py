"""A Hugging Face tokenizer from GGUF tokenizer metadata: byte-level BPE ("gpt2", with llama.cpp's
pre-tokenizer per `tokenizer.ggml.pre`) and sentencepiece-style BPE ("llama") vocabularies."""

from __future__ import annotations

from typing import Any

__all__ = ["build_tokenizer"]

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
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    if kind == "gpt2":
        tok = _gpt2_tokenizer(meta, tokens, types)
    elif kind == "llama":
        tok = _llama_tokenizer(meta, tokens)
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
    bos, eos = _special(meta, tokens, "bos_token_id"), _special(meta, tokens, "eos_token_id")
    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if add_eos and eos is not None else []
    tok.post_processor = _post_processor(tokens, head, tail)
    return tok, _tokenizer_config(meta, tokens, types, add_bos, add_eos)


def _gpt2_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """Byte-level BPE with llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`. Respells, in
    `tokens`, the normal tokens written as raw text rather than in the byte alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pre = meta.get("tokenizer.ggml.pre", "default")
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
    return tok


def _llama_tokenizer(meta: dict[str, Any], tokens: list[str]) -> Any:
    """Sentencepiece-style BPE with byte fallback; merges from the file or from the scores."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

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
    return tok


def _special(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    """The token named by `tokenizer.ggml.<key>`, or None when absent or out of range."""
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def _post_processor(tokens: list[str], head: list[str], tail: list[str]) -> Any:
    """A post-processor that puts `head` before and `tail` after each sequence."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=" ".join([*head, "$A", *tail]),
        pair=" ".join([*head, "$A", *tail, *[f"{t}:1" for t in head], "$B:1", *[f"{t}:1" for t in tail]]),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(head + tail)],
    )


def _tokenizer_config(meta: dict[str, Any], tokens: list[str], types: list[int], add_bos: bool,
                      add_eos: bool) -> dict[str, Any]:
    """The tokenizer_config.json of a GGUF vocabulary (with its chat template when it has one)."""
    arch = meta.get("general.architecture", "llama")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _special(meta, tokens, "bos_token_id"),
        "eos_token": _special(meta, tokens, "eos_token_id"),
        "unk_token": _special(meta, tokens, "unknown_token_id"),
        "pad_token": _special(meta, tokens, "padding_token_id"),
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
    return config
