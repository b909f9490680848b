"""Chat templates for the DSL's roles: the model's own jinja template, or a built-in one.

A program's text grows append-only, so a role is rendered as a (prefix, suffix) pair around its
content. `ChatTemplate.role_affixes(history, role)` finds the pair by rendering the conversation
with and without one more message whose content is a sentinel: what the new message adds is
prefix + sentinel + suffix. Context-dependent parts of a template (a default system prompt before
the first message, BOS) thus come out exactly as the model's template writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from radixflow.runtime.text.chat_template import compile_chat_template

Messages = Sequence[dict[str, Any]]
_SENTINEL = "\x00radixflow-role-content\x00"

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-Instruct: a system message is folded into the next [INST] block.
_MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '[INST] ' + message['content'] + '\n\n' }}{% elif message['role'] == 'user' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}{{ '[INST] ' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
_PLAIN = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# name -> (source, special tokens, stop strings)
BUILTIN_TEMPLATES: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {
    "chatml": (_CHATML, {}, ("<|im_end|>",)),
    "smollm2": (_SMOLLM2, {"eos_token": "<|im_end|>"}, ("<|im_end|>",)),
    "qwen2": (_QWEN2, {"eos_token": "<|im_end|>"}, ("<|im_end|>",)),
    "llama-3": (_LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ("<|eot_id|>",)),
    "mistral": (_MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}, ("</s>",)),
    "default": (_PLAIN, {}, ()),
}


@dataclass(frozen=True)
class ChatTemplate:
    """How a model formats a conversation: `render(messages, add_generation_prompt) -> str` and the
    stop strings that end an assistant turn (added to every `gen` inside an assistant role)."""

    render: Callable[[Messages, bool], str]
    stop_strings: tuple[str, ...] = ()
    name: str = "custom"

    @classmethod
    def from_source(cls, source: str, special_tokens: dict[str, str] | None = None,
                    stop_strings: Sequence[str] = (), name: str = "custom") -> ChatTemplate:
        """A template from jinja source, compiled in the tokenizer's environment (Hugging Face
        `chat_template` conventions: `tojson`, `raise_exception`, `strftime_now`, `{% generation %}`)."""
        template = compile_chat_template(source)
        tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

        def render(messages: Messages, add_generation_prompt: bool) -> str:
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **tokens)

        return cls(render, tuple(stop_strings), name)

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """One of BUILTIN_TEMPLATES; KeyError for an unknown name."""
        source, tokens, stops = BUILTIN_TEMPLATES[name]
        return cls.from_source(source, tokens, stops, name)

    def role_affixes(self, history: Messages, role: str) -> tuple[str, str]:
        """(prefix, suffix) that wrap the content of a `role` message appended to `history`.

        For the assistant role the prefix is the template's generation prompt when that is how the
        template starts an assistant turn. Falls back to the plain "Role: content" form when the
        template refuses the conversation or does not render it append-only. The first message's
        prefix includes what the template writes before any message (e.g. a BOS string), exactly as
        `render` does."""
        try:
            prev = self.render(list(history), False) if history else ""
            full = self.render([*history, {"role": role, "content": _SENTINEL}], False)
        except jinja2.exceptions.TemplateError:
            return f"{role.capitalize()}: ", "\n\n"
        if not full.startswith(prev) or full.count(_SENTINEL) != 1:
            return f"{role.capitalize()}: ", "\n\n"
        prefix, suffix = full[len(prev):].split(_SENTINEL)
        if role == "assistant":
            try:
                gen_prompt = self.render(list(history), True)[len(prev):]
            except jinja2.exceptions.TemplateError:
                gen_prompt = ""
            if gen_prompt and prefix.endswith(gen_prompt):
                prefix = prefix[: len(prefix) - len(gen_prompt)] + gen_prompt
        return prefix, suffix


def guess_builtin(model_path: str) -> str:
    """The built-in template name for a model path (by its name), "default" when nothing matches."""
    p = model_path.lower().replace("_", "-")
    if "smollm" in p:
        return "smollm2"
    if "llama-3" in p or "llama3" in p:
        return "llama-3"
    if "qwen" in p:
        return "qwen2"
    if "mistral" in p or "mixtral" in p:
        return "mistral"
    if "chatml" in p or "hermes" in p:
        return "chatml"
    return "default"
