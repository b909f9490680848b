"""Tokenizer and IncrementalDecoder against transformers on the default model."""

from __future__ import annotations

import copy
import json
import random
import shutil
import unicodedata
from pathlib import Path

import jinja2
import pytest

from radixflow.runtime.loading import default_model as dm
from radixflow.runtime.text.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "",
    "Hello world",
    "The capital of France is Paris.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand   runs      of spaces",
    "naïve café, façade, Ångström, straße, ŁÓDŹ",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ ✓ 🤖",
    "Ελληνικά και русский текст, עברית, العربية",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n\t\treturn sum;",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <repo_name>x",
    "<|im_start|> not quite <|im_start |><|im_end",
    "I'm sure you'll see they've done it, hasn't he? WE'RE LOUD",
    "URLs: https://example.com/a?b=c&d=e#f and emails a.b@c.org",
    "\u200b zero\u00a0width and nbsp \ufeff bom \x00 nul",
    "ǅ ﬁ ﬀ Ⅻ ① ½ ² ٣",
    "2024-01-01 pi=3.14159 1,000,000 0x1F 1e-5",
    "a  123 and  7 after double spaces, \t1\n 2",
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return Path(dm.default_model_path())


@pytest.fixture(scope="session")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_gguf_tok():
    """transformers' own tokenizer built from the GGUF (the task's reference)."""
    path = Path(dm.default_gguf_path())
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_smollm_tok(hf_gguf_tok):
    """The same, with the pre-tokenizer of SmolLM2's own tokenizer.json and of llama.cpp's
    "smollm" pre-type: every numeric character is split off before the GPT-2 regex runs.
    transformers' GGUF loader omits that split, which changes whitespace runs before digits."""
    from tokenizers import pre_tokenizers

    fixed = copy.deepcopy(hf_gguf_tok)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return fixed


# -- encode / decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(tok: Tokenizer, hf_smollm_tok, hf_gguf_tok, text: str) -> None:
    for add in (True, False):
        ids = tok.encode(text, add_special_tokens=add)
        assert ids == hf_smollm_tok.encode(text, add_special_tokens=add)
        if not any(unicodedata.category(c).startswith("N") for c in text):
            assert ids == hf_gguf_tok.encode(text, add_special_tokens=add)


def test_digits_split_like_llama_cpp(tok: Tokenizer) -> None:
    # "a", "ĠĠ", "1", "2", "3": the space run stays one token (transformers' GGUF loader gives Ġ, Ġ)
    assert tok.encode("a  123") == [81, 256, 33, 34, 35]
    assert tok.convert_ids_to_tokens(tok.encode("a  123")) == ["a", "ĠĠ", "1", "2", "3"]


def test_encode_batch(tok: Tokenizer) -> None:
    assert tok.encode_batch(CORPUS) == [tok.encode(t) for t in CORPUS]


def test_special_tokens_in_text(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # SmolLM2 adds no BOS


@pytest.mark.parametrize("text", CORPUS)
def test_decode_matches_transformers(tok: Tokenizer, hf_gguf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_gguf_tok.decode(ids, skip_special_tokens=skip)


def test_decode_random_ids_matches_transformers(tok: Tokenizer, hf_gguf_tok) -> None:
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert tok.decode(ids, skip_special_tokens=False) == hf_gguf_tok.decode(ids, skip_special_tokens=False)


def test_convert_ids_to_tokens(tok: Tokenizer, hf_gguf_tok) -> None:
    ids = tok.encode(CORPUS[7])
    assert tok.convert_ids_to_tokens(ids) == hf_gguf_tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok.token_to_id("<|im_end|>") == 2


def test_properties(tok: Tokenizer, model_dir: Path) -> None:
    assert tok.eos_token_ids == {2}
    assert tok.bos_token_id == 1
    assert tok.pad_token_id == 2
    assert tok.vocab_size == len(tok) == 49152
    assert tok.all_special_ids == list(range(17))
    assert tok.chat_stop_strings == ("<|im_end|>",)
    assert tok.path == str(model_dir)


# -- chat templates ------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke about ünïcödé 😀"},
        {"role": "assistant", "content": "Why did the byte cross the road?"},
        {"role": "user", "content": "Why?\n\nTell me."},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_gguf_tok, messages, add_generation_prompt) -> None:
    expected = hf_gguf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


LLAMA3_LIKE_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if tools is not none %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\nTools:\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=2) }}\\n{%- endfor %}"
    "{{- 'Date: ' + strftime_now('%Y') + '<|eot_id|>' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message['role'] not in ['user', 'assistant', 'system'] %}"
    "{{- raise_exception('bad role ' + message['role']) }}{%- endif %}\n"
    "  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "  {%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim }}"
    "{% endgeneration %}{%- else %}{{- message['content'] | trim }}{%- endif %}\n"
    "  {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)


@pytest.fixture()
def llama3_like_dir(model_dir: Path, tmp_path: Path) -> Path:
    """The default tokenizer plus <|eot_id|> etc. as special tokens, a post-processor that adds
    BOS (as Llama 3's tokenizer.json has), and a Llama 3-style template using tools, tojson,
    strftime_now, raise_exception and {% generation %}."""
    from tokenizers import AddedToken, processors
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(model_dir / "tokenizer.json"))
    names = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|>:1 $B:1", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "add_bos_token", "add_eos_token"):
        config.pop(key)
    config["chat_template"] = LLAMA3_LIKE_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    return tmp_path


def test_llama3_like_template_and_bos(llama3_like_dir: Path) -> None:
    ours = Tokenizer.from_pretrained(llama3_like_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(llama3_like_dir))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for messages in CONVERSATIONS:
        for kwargs in ({}, {"tools": tools}):
            expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            assert ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == expected
    assert ours.chat_stop_strings == ("<|eot_id|>",)
    # BOS from the tokenizer.json post-processor, as transformers does
    for text in CORPUS[:8]:
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text)[0] == ours.bos_token_id == 1
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizerFast", "PreTrainedTokenizerFast"])
def test_add_bos_token_flag(model_dir: Path, tmp_path: Path, tokenizer_class: str) -> None:
    """A Llama-class tokenizer_config's add_bos_token rebuilds the post-processor; otherwise the
    post-processor in tokenizer.json decides (transformers 5 behaves the same way)."""
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "add_eos_token": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    plain = ours.encode("hi", add_special_tokens=False)
    expected = [1, *plain, 2] if tokenizer_class == "LlamaTokenizerFast" else plain
    assert ours.encode("hi") == expected


def test_default_template_when_missing(model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == DEFAULT_CHAT_TEMPLATE
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "User: Hi\n\nAssistant:"
    assert ours.chat_stop_strings == ()
    assert ours.eos_token_ids == set()


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# -- incremental detokenization ------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, **kwargs) -> list[str]:
    decoder = IncrementalDecoder(tok, **kwargs)
    parts, i = [], 0
    while i < len(ids):
        k = rng.randrange(1, 4)
        parts.append(decoder.step(ids[i : i + k]))
        i += k
    parts.append(decoder.flush())
    return parts


def test_incremental_equals_full_decode_on_random_streams(tok: Tokenizer) -> None:
    rng = random.Random(0)
    multibyte = tok.encode("😀🎉👩‍👩‍👧‍👦 naïve 日本語 ✓ ́ é", add_special_tokens=False)
    for _ in range(300):
        ids = [
            rng.choice(multibyte) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randrange(1, 40))
        ]
        for skip in (True, False):
            parts = _stream(tok, ids, rng, skip_special_tokens=skip)
            assert "".join(parts) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_holds_back_partial_characters(tok: Tokenizer) -> None:
    text = "Emoji 😀 and 👩‍👩‍👧‍👦 then 日本語."
    ids = tok.encode(text)
    assert len(ids) > len(tok.decode(ids).split())  # multi-byte characters span several tokens
    decoder = IncrementalDecoder(tok)
    parts = [decoder.step([i]) for i in ids]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + decoder.flush() == text


def test_incremental_with_prompt_context(tok: Tokenizer) -> None:
    for prompt_text in ("The capital of France is", "Hi", ""):
        prompt = tok.encode(prompt_text)
        out = tok.encode(" Paris, of course! 😀")
        decoder = IncrementalDecoder(tok, prompt_ids=prompt)
        text = "".join(decoder.step([i]) for i in out) + decoder.flush()
        assert text == " Paris, of course! 😀"


def test_incremental_flush_returns_invalid_tail(tok: Tokenizer) -> None:
    partial = tok.encode("😀")[:1]  # the first bytes of the emoji only
    decoder = IncrementalDecoder(tok)
    assert decoder.step(tok.encode("ok ")) == "ok "
    assert decoder.step(partial) == ""
    assert decoder.flush() == "\ufffd"
