"""Text <-> token ids for a Hugging Face-style model folder, without transformers.

`Tokenizer` wraps a `tokenizers.Tokenizer` (tokenizer.json) plus tokenizer_config.json and renders
chat templates the way transformers does (in chat_template.py's jinja2 environment).
`IncrementalDecoder` turns a stream of token ids into a stream of finished text pieces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from tokenizers import processors

from radixflow.runtime.text.chat_template import compile_chat_template

__all__ = ["Tokenizer", "IncrementalDecoder", "DEFAULT_CHAT_TEMPLATE"]

# Used when a model folder has no chat template: "Role: content" paragraphs.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# Tokenizer classes whose add_bos_token/add_eos_token settings rebuild the post-processor.
_HONORS_BOS_FLAGS = frozenset(
    f"{name}{suffix}" for name in ("LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer") for suffix in ("", "Fast")
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and contractions."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """A model folder's tokenizer: encode, decode, chat template, special ids.

    Encoding equals transformers' tokenizer on the same folder. BOS/EOS come from tokenizer.json's
    post-processor; tokenizer_config.json's `add_bos_token`/`add_eos_token` replace it only for
    Llama/Gemma tokenizer classes or when there is none, which is where transformers honors them.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        path: str,
        config: dict[str, Any],
        model_config: dict[str, Any],
        generation_config: dict[str, Any],
        chat_template: str | list[dict[str, str]] | None,
    ) -> None:
        self._tok = backend
        self._tok.no_truncation()  # some tokenizer.json files carry training-time settings
        self._tok.no_padding()
        self._path = path
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        self._chat_template = chat_template
        self._special_tokens = {
            key: _token_str(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        explicit = "add_bos_token" in config or "add_eos_token" in config
        if backend.post_processor is None or (explicit and config.get("tokenizer_class") in _HONORS_BOS_FLAGS):
            self._set_post_processor(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))

        def tid(key: str, *fallbacks: Any) -> int | None:
            token = self._special_tokens[key]
            i = backend.token_to_id(token) if token is not None else None
            return i if i is not None else next((f for f in fallbacks if isinstance(f, int)), None)

        self._bos_id = tid("bos_token", model_config.get("bos_token_id"))
        self._pad_id = tid("pad_token", generation_config.get("pad_token_id"), model_config.get("pad_token_id"))
        eos = set(_ids(generation_config.get("eos_token_id"))) | set(_ids(model_config.get("eos_token_id")))
        eos_tok = tid("eos_token")
        self._eos_ids = frozenset(eos | ({eos_tok} if eos_tok is not None else set()))
        added = backend.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        named = (tid(k) for k in self._special_tokens)
        self._all_special_ids = sorted(special | {i for i in named if i is not None})
        self._added_contents = sorted((t.content for t in added.values()), key=len, reverse=True)
        self._stop_strings: tuple[str, ...] | None = None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load from a folder with tokenizer.json (required), tokenizer_config.json, config.json,
        generation_config.json and chat_template.jinja/.json (all optional)."""
        root = Path(folder)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(root)!r}")
        backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        template: Any = config.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif (root / "chat_template.json").is_file():
            template = _read_json(root / "chat_template.json").get("chat_template")
        return cls(
            backend,
            str(root),
            config,
            _read_json(root / "config.json"),
            _read_json(root / "generation_config.json"),
            template,
        )

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self._special_tokens["bos_token"], self._special_tokens["eos_token"]
        known = self._tok.token_to_id
        head = [bos] if add_bos and bos is not None and known(bos) is not None else []
        tail = [eos] if add_eos and eos is not None and known(eos) is not None else []
        self._tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*head, "$A", *tail]),
            pair=" ".join([*head, "$A", *tail, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]),
            special_tokens=[(t, self._tok.token_to_id(t)) for t in dict.fromkeys(head + tail)],
        )

    # -- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """`encode` for a whole prompt: special tokens added as the model expects, but a BOS
        that a chat template already wrote into the text is not doubled."""
        ids = self.encode(text, add_special_tokens=True)
        bos = self._bos_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            return ids[1:]
        return ids

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The named special tokens: bos_token, eos_token, unk_token, pad_token (None if unset)."""
        return dict(self._special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text (in parallel inside the tokenizers library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str:
        """Text of `ids` (unknown ids are dropped). `spaces_between_special_tokens` is accepted for
        API compatibility; like transformers' fast tokenizers, output does not depend on it."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Vocabulary strings of ids (None for unknown ids); an int gives one string."""
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string, or None."""
        return self._tok.token_to_id(token)

    # -- chat ----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        """The default chat template source (DEFAULT_CHAT_TEMPLATE when the folder has none)."""
        return self._select_template(None)

    def template_for(self, tools: Any = None) -> str:
        """The chat template source used for a conversation with (or without) `tools`."""
        return self._select_template(tools)

    def _select_template(self, tools: Any) -> str:
        template = self._chat_template
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
        return template or DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, rendered like transformers' `apply_chat_template(...,
        tokenize=False)`. Extra keyword arguments (e.g. `enable_thinking`) reach the template.
        Raises jinja2.TemplateError when the template rejects the conversation."""
        for m in messages:
            if not isinstance(m, dict):
                raise TypeError(f"chat messages must be dicts, got {type(m).__name__}")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TypeError("tools must be JSON-schema dicts")
        context = {k: v for k, v in self._special_tokens.items() if v is not None}
        context.update(kwargs)
        return compile_chat_template(self._select_template(tools)).render(
            messages=list(messages),
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """The template's end-of-turn marker (e.g. "<|im_end|>", "<|eot_id|>"): the added token
        that follows an assistant message's content; () when there is none."""
        if self._stop_strings is None:
            self._stop_strings = self._find_end_of_turn()
        return self._stop_strings

    def _find_end_of_turn(self) -> tuple[str, ...]:
        probe = "radixflow-probe-answer"
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
        try:
            text = self.apply_chat_template(messages, add_generation_prompt=False)
        except jinja2.TemplateError:
            return ()
        at = text.find(probe)
        if at < 0:
            return ()
        rest = text[at + len(probe) :].lstrip()
        return next(((t,) for t in self._added_contents if t and rest.startswith(t)), ())

    # -- properties ----------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: generation_config, config and tokenizer_config eos."""
        return set(self._eos_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of token strings, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of special added tokens and of the named bos/eos/unk/pad tokens."""
        return list(self._all_special_ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(path={self._path!r}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Streaming detokenization for one request (the prefix/read-offset method of vLLM and SGLang).

    `step(new_ids)` returns the text that became final with these ids; text that could still
    change (an incomplete UTF-8 sequence, shown as a trailing U+FFFD) is held back. Without
    `prompt_ids`, `"".join(steps) + flush()` equals `tokenizer.decode(all ids)`. With
    `prompt_ids`, the last few prompt tokens give context (e.g. the space before the first word)
    and are not themselves emitted.
    """

    CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        self._ids = [int(i) for i in list(prompt_ids)[-self.CONTEXT_TOKENS :]]
        self._prefix = 0  # start of the window already turned into text
        self._read = len(self._ids)  # end of the text already returned

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, self._skip, self._spaces)

    def step(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the newly finished text ("" if none)."""
        self._ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        out = text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._trim()
        return out

    def flush(self) -> str:
        """Return all text not yet returned, held-back bytes included (as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        self._trim()
        return text[len(prefix_text) :]

    def _trim(self) -> None:
        """Drop ids before the window so memory stays bounded on long generations."""
        if self._prefix:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
