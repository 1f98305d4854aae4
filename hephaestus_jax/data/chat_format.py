"""Forge records -> tokens and loss masks. `resolve_chat_format` decides how chats are rendered with a tokenizer:

* with the tokenizer's own chat template (`chat_template.TemplateRenderer`, as transformers' `apply_chat_template`
  renders it) whenever one ships beside it: Llama-3.1, SmolLM2, Qwen2.5, Hermes ...;
* else with a fallback written in code, by name or detected from the special tokens (`CHAT_FORMATS`): `llama3`
  (Meta's Llama-3.1 format with JSON tool calling, below) or `chatml` (Hermes-style tool calling, see
  `_chatml_conversation`).

Pre-training documents (tool docs, code, text) are the tokenizer's prefix (BOS) + text + EOS. The `llama3` fallback
renders conversations (trajectories, SFT examples, prompts) in Meta's Llama-3.1 format:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    Environment: ipython\\n                                   (only when there are tools)
    Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n
    You have access to the following functions. ...\\n\\n     (only when there are tools: one JSON object per tool)
    <system message><|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<content><|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n<content><|python_tag|>{"name": ..., "parameters": {...}}<|eom_id|>
    <|start_header_id|>ipython<|end_header_id|>\\n\\n<tool result><|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n<answer><|eot_id|>

Parallel tool calls are one JSON object per line after `<|python_tag|>`. The date is fixed (the default of Meta's
Hugging Face chat template), never read from the clock. docs/data_format.md shows decoded examples. In the
fallbacks, text pieces go through `vocab.encode` (special-token strings in them stay text) and control tokens are
inserted by id.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import seqio

from hephaestus_jax.config import CHAT_FORMAT_NAMES, ConfigError
from hephaestus_jax.data.chat_template import ChatTemplate, ChatTemplateError, TemplateRenderer, load_chat_template
from hephaestus_jax.data.chat_text import (
    chatml_system_prompt, chatml_text, render_tool_calls, system_prompt, tool_documentation_text, tool_result_text,
)
from hephaestus_jax.data.example import Example
from hephaestus_jax.data.forge import (
    CodeDocument,
    ForgeFormatError,
    Message,
    Record,
    SftExample,
    TextDocument,
    ToolDoc,
    Trajectory,
    trajectory_messages,
    validate_conversation,
)
from hephaestus_jax.data.vocab import forge_vocabulary, text_prefix_ids, tokenizer_fingerprint


class _Builder:
    """Accumulates tokens with their loss-mask values."""

    def __init__(self, vocab: seqio.Vocabulary):
        self.vocab = vocab
        self.tokens: list[int] = []
        self.mask: list[int] = []

    def text(self, text: str, target: bool) -> None:
        ids = self.vocab.encode(text) if text else []
        self.tokens.extend(ids)
        self.mask.extend([int(target)] * len(ids))

    def special(self, token_id: int, target: bool) -> None:
        self.tokens.append(token_id)
        self.mask.append(int(target))

    def example(self) -> Example:
        return Example(np.asarray(self.tokens, np.int32), np.asarray(self.mask, np.int32))


# --------------------------------------------------------------------------------------------------------------
# Conversations.
# --------------------------------------------------------------------------------------------------------------


def _start(vocab: seqio.Vocabulary) -> _Builder:
    builder = _Builder(vocab)
    for token_id in text_prefix_ids(vocab):
        builder.special(token_id, False)
    return builder


def _header(builder: _Builder, vocab: seqio.Vocabulary, role: str, target: bool) -> None:
    builder.special(vocab.special_id("<|start_header_id|>"), target)
    builder.text(role, target)
    builder.special(vocab.special_id("<|end_header_id|>"), target)
    builder.text("\n\n", target)


def _conversation(
    messages: Sequence[Message], tools: Sequence[ToolDoc], vocab: seqio.Vocabulary, *, train_on_all: bool
) -> _Builder:
    """Llama-3.1: BOS, the system turn and every message; assistant messages are always targets, the rest if
    train_on_all."""
    builder = _start(vocab)
    eot, eom = vocab.special_id("<|eot_id|>"), vocab.special_id("<|eom_id|>")
    has_system = bool(messages) and messages[0].role == "system"
    _header(builder, vocab, "system", train_on_all)
    builder.text(system_prompt(messages[0].content if has_system else "", tools), train_on_all)
    builder.special(eot, train_on_all)
    for message in messages[1:] if has_system else messages:
        target = train_on_all or message.role == "assistant"
        _header(builder, vocab, message.role, train_on_all)
        if message.role == "ipython":
            builder.text(tool_result_text(message.content), target)
        else:
            builder.text(message.content.strip(), target)
        if message.tool_calls:
            builder.special(vocab.special_id("<|python_tag|>"), target)
            builder.text(render_tool_calls(message.tool_calls), target)
            builder.special(eom, target)
        else:
            builder.special(eot, target)
    return builder


_CHATML_ROLES = {"ipython": "tool"}
"""Forge role -> ChatML role (tool results are a `tool` turn)."""


def _chatml_turn(builder: _Builder, vocab: seqio.Vocabulary, role: str, text: str, *, target: bool,
                 header_target: bool) -> None:
    builder.special(vocab.special_id("<|im_start|>"), header_target)
    builder.text(role + "\n", header_target)
    builder.text(text, target)
    builder.special(vocab.special_id("<|im_end|>"), target)
    builder.text("\n", header_target)


def _chatml_conversation(
    messages: Sequence[Message], tools: Sequence[ToolDoc], vocab: seqio.Vocabulary, *, train_on_all: bool
) -> _Builder:
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per turn; a system turn when there is a system message or
    tools; assistant content and its `<|im_end|>` are always targets, everything if train_on_all."""
    builder = _start(vocab)
    has_system = bool(messages) and messages[0].role == "system"
    system = chatml_system_prompt(messages[0].content if has_system else "", tools)
    if has_system or tools:
        _chatml_turn(builder, vocab, "system", system, target=train_on_all, header_target=train_on_all)
    for message in messages[1:] if has_system else messages:
        _chatml_turn(builder, vocab, _CHATML_ROLES.get(message.role, message.role), chatml_text(message),
                     target=train_on_all or message.role == "assistant", header_target=train_on_all)
    return builder


def _chatml_assistant_header(builder: _Builder, vocab: seqio.Vocabulary) -> None:
    builder.special(vocab.special_id("<|im_start|>"), False)
    builder.text("assistant\n", False)


@dataclass(frozen=True)
class ChatFormat:
    """A fallback chat format written in code: the special tokens it needs, how it renders a conversation, how it
    opens a reply."""

    name: str
    required_tokens: tuple[str, ...]
    build: Callable[..., _Builder]
    assistant_header: Callable[[_Builder, seqio.Vocabulary], None]


CHAT_FORMATS: dict[str, ChatFormat] = {
    "llama3": ChatFormat(
        "llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        _conversation, lambda builder, vocab: _header(builder, vocab, "assistant", False)),
    "chatml": ChatFormat("chatml", ("<|im_start|>", "<|im_end|>"), _chatml_conversation, _chatml_assistant_header),
}
"""The fallback chat formats by name (gin `DataConfig.chat_format`, the CLIs' --chat_format), for tokenizers that
ship no chat template."""

TEMPLATE = CHAT_FORMAT_NAMES[0]
"""`DataConfig.chat_format` / --chat_format value that requires the tokenizer's own chat template."""


@dataclass(frozen=True)
class FormatRenderer:
    """Renders chats in a fallback `ChatFormat` with one vocabulary."""

    format: ChatFormat
    vocab: seqio.Vocabulary

    @property
    def name(self) -> str:
        return self.format.name

    def conversation(self, messages: Sequence[Message], tools: Sequence[ToolDoc], *, train_on_all: bool) -> Example:
        return self.format.build(messages, tools, self.vocab, train_on_all=train_on_all).example()

    def prompt(self, messages: Sequence[Message], tools: Sequence[ToolDoc]) -> np.ndarray:
        builder = self.format.build(messages, tools, self.vocab, train_on_all=False)
        self.format.assistant_header(builder, self.vocab)
        return np.asarray(builder.tokens, np.int32)


@dataclass(frozen=True)
class TextRenderer:
    """Documents only: a tokenizer without named special tokens (SentencePiece) has no chat format."""

    vocab: seqio.Vocabulary
    name: str = "none"

    def conversation(self, messages: Sequence[Message], tools: Sequence[ToolDoc], *, train_on_all: bool) -> Example:
        return self.prompt(messages, tools)

    def prompt(self, messages: Sequence[Message], tools: Sequence[ToolDoc]) -> np.ndarray:
        raise TypeError(f"chat formats need a tokenizer with named special tokens, got {type(self.vocab).__name__}")


ChatRenderer = Union[FormatRenderer, TemplateRenderer, TextRenderer]


def resolve_chat_format(vocab: seqio.Vocabulary, name: str | None = None) -> ChatRenderer:
    """How chats are rendered with `vocab`: `name` (a fallback of `CHAT_FORMATS`, or "template"), else the
    tokenizer's own chat template when it ships one, else the first fallback whose special tokens the tokenizer has.
    Checks the tokens a fallback needs exist (ConfigError naming them). A tokenizer without named special tokens
    (SentencePiece) renders documents only (`TextRenderer`)."""
    special = getattr(vocab, "special_tokens", None)
    if special is None and name is None:
        return TextRenderer(vocab)
    if special is None:
        raise ConfigError(f"chat format {name!r} needs a tokenizer with named special tokens, got "
                         f"{type(vocab).__name__}")
    where = getattr(vocab, "path", vocab)
    if name in (None, TEMPLATE):
        template = _shipped_template(where) if isinstance(where, str) else None
        if template is not None:
            return TemplateRenderer(template, vocab)
        if name == TEMPLATE:
            raise ConfigError(f"chat format {TEMPLATE!r}: the tokenizer {where} ships no chat template (neither "
                             "chat_template.jinja nor tokenizer_config.json's chat_template beside it)")
        for chat_format in CHAT_FORMATS.values():
            if all(token in special for token in chat_format.required_tokens):
                return FormatRenderer(chat_format, vocab)
        raise ConfigError(f"the tokenizer {where} ships no chat template and has the special tokens of none of the "
                         f"chat formats {sorted(CHAT_FORMATS)}")
    if name not in CHAT_FORMATS:
        raise ConfigError(f"unknown chat format {name!r}; known: {sorted([TEMPLATE, *CHAT_FORMATS])}")
    chat_format = CHAT_FORMATS[name]
    missing = [token for token in chat_format.required_tokens if token not in special]
    if missing:
        raise ConfigError(f"chat format {name!r} needs the special tokens {missing}, which the tokenizer "
                         f"{where} lacks")
    return FormatRenderer(chat_format, vocab)


@functools.lru_cache(maxsize=16)
def _shipped_template(tokenizer_path: str) -> ChatTemplate | None:
    return load_chat_template(os.path.dirname(os.path.abspath(tokenizer_path)))


def render_chat_prompt(messages: Sequence[Message], tools: Sequence[ToolDoc], renderer: ChatRenderer) -> np.ndarray:
    """int32 tokens of a conversation followed by an open assistant turn, for generation and evaluation."""
    validate_conversation(messages, tools)
    return renderer.prompt(messages, tools)


def forge_renderer(tokenizer_path: str | None = None, chat_format: str | None = None) -> ChatRenderer:
    """How Forge data is rendered for a run: the tokenizer (`vocab.forge_vocabulary`: the shipped Llama-3 one by
    default) and its chat format (`resolve_chat_format`), resolved once and passed down explicitly."""
    return resolve_chat_format(forge_vocabulary(tokenizer_path), chat_format)


def rendering_identity(renderer: ChatRenderer) -> dict[str, Any]:
    """What determines a rendering, as recorded by prepared data: the tokenizer (a fingerprint of every id's bytes,
    its prefix and EOS ids) and the chat format (for a template, a fingerprint of its source)."""
    vocab = renderer.vocab
    template = renderer.template.source if isinstance(renderer, TemplateRenderer) else None
    return {
        "tokenizer": tokenizer_fingerprint(vocab),
        "tokenizer_path": str(getattr(vocab, "path", "")),
        "prefix_ids": list(text_prefix_ids(vocab)),
        "eos_id": int(vocab.eos_id),
        "chat_format": renderer.name,
        "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if template is not None else None,
    }


# --------------------------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------------------------


def _plain_document(text: str, vocab: seqio.Vocabulary) -> Example:
    builder = _start(vocab)
    builder.text(text, True)
    builder.special(vocab.eos_id, True)
    return builder.example()


def _conversation_of(record: Trajectory | SftExample, messages: Sequence[Message], renderer: ChatRenderer, *,
                     train_on_all: bool) -> Example:
    try:
        return renderer.conversation(messages, record.tools, train_on_all=train_on_all)
    except ChatTemplateError as e:
        raise ForgeFormatError(record.origin or f"<{type(record).__name__}>", str(e), "messages") from None


def render_document(record: Record, renderer: ChatRenderer) -> Example:
    """Tokens and loss mask of one Forge record, rendered with `renderer` (`resolve_chat_format`, `forge_renderer`).

    tool_docs / code / text: the tokenizer's prefix (BOS) + text + EOS, every token after BOS a target (any seqio
    vocabulary with bos/eos works). Trajectories: the whole chat transcript, every token after BOS a target.
    SFT: targets are exactly each assistant message's content (incl. tool calls) and its closing end-of-turn
    token (`<|eot_id|>`/`<|eom_id|>`, `<|im_end|>`), never a header; an example with no target raises
    ForgeFormatError.
    """
    if isinstance(record, ToolDoc):
        return _plain_document(tool_documentation_text(record), renderer.vocab)
    if isinstance(record, (CodeDocument, TextDocument)):
        return _plain_document(record.text, renderer.vocab)
    if isinstance(record, Trajectory):
        return _conversation_of(record, trajectory_messages(record), renderer, train_on_all=True)
    if isinstance(record, SftExample):
        example = _conversation_of(record, record.messages, renderer, train_on_all=False)
        if not example.loss_mask.any():
            raise ForgeFormatError(
                record.origin or "<SftExample>", "no assistant message, so the loss mask is empty", "messages"
            )
        return example
    raise TypeError(f"not a Forge record: {type(record).__name__}")
