"""Forge records -> tokens and loss masks, in a chat format of the registry `CHAT_FORMATS`: `llama3` (Meta's
Llama-3.1 format with JSON tool calling, below) or `chatml` (Hermes-style tool calling, as Qwen2.5, Hermes and
SmolLM2 use; see `_chatml_conversation`). `resolve_chat_format` picks the format by name or from the tokenizer's
special tokens and names any token the tokenizer lacks.

Pre-training documents (tool docs, code, text) are `<|begin_of_text|>` + text + `<|end_of_text|>`. Conversations
(trajectories, SFT examples, prompts) follow Meta's Llama-3.1 format:

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
Hugging Face chat template), never read from the clock. docs/data_format.md shows decoded examples.
Text pieces go through `vocab.encode` (special-token strings in them stay text); control tokens are inserted by id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import seqio

from hephaestus_jax.data.forge import (
    CodeDocument,
    ForgeFormatError,
    Message,
    Record,
    SftExample,
    TextDocument,
    ToolCall,
    ToolDoc,
    Trajectory,
    trajectory_messages,
    validate_conversation,
)
from hephaestus_jax.data.example import Example
from hephaestus_jax.data.vocab import text_prefix_ids

KNOWLEDGE_CUTOFF = "December 2023"
TODAY_DATE = "26 Jul 2024"
"""Fixed date in the system header (the default `date_string` of Meta's Llama-3.1 chat template)."""

TOOL_INSTRUCTIONS = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
"""Meta's Llama-3.1 instruction that precedes the tool definitions in the system prompt."""


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
# Text pieces shared with the evaluator.
# --------------------------------------------------------------------------------------------------------------


def render_tool_calls(calls: Sequence[ToolCall]) -> str:
    """Canonical assistant text for tool calls: one `{"name": ..., "parameters": {...}}` JSON object per line.

    In a conversation this text follows `<|python_tag|>` and is closed by `<|eom_id|>`.
    """
    return "\n".join(
        json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False) for call in calls
    )


def tool_schema(tool: ToolDoc) -> dict[str, Any]:
    """The tool as listed in the system prompt: {"type": "function", "function": {name, description, parameters}}."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)},
    }


def system_prompt(system_message: str, tools: Sequence[ToolDoc]) -> str:
    """Text of the system turn (between its header and `<|eot_id|>`)."""
    parts = []
    if tools:
        parts.append("Environment: ipython\n")
    parts.append(f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {TODAY_DATE}\n\n")
    if tools:
        parts.append(TOOL_INSTRUCTIONS)
        parts.extend(json.dumps(tool_schema(tool), indent=4, ensure_ascii=False) + "\n\n" for tool in tools)
    parts.append(system_message.strip())
    return "".join(parts)


def tool_documentation_text(tool: ToolDoc) -> str:
    """Readable Markdown documentation of a tool, used as a pre-training document."""
    sections = [f"# {tool.name}"]
    if tool.description.strip():
        sections.append(tool.description.strip())
    sections.append("## Parameters\n\n" + _parameters_text(tool))
    if tool.returns is not None:
        sections.append("## Returns\n\n" + _json_or_text(tool.returns))
    if tool.examples:
        sections.append("## Examples\n\n" + "\n\n".join(_json_or_text(example) for example in tool.examples))
    if tool.source:
        sections.append(f"Source: {tool.source}")
    return "\n\n".join(sections) + "\n"


def _parameters_text(tool: ToolDoc) -> str:
    properties = tool.parameters["properties"]
    if not properties:
        return "This tool takes no parameters."
    required = set(tool.required_parameters)
    lines = []
    for name, schema in properties.items():
        kind = schema.get("type", "any")
        kind = " or ".join(kind) if isinstance(kind, list) else str(kind)
        description = schema.get("description")
        description = description.strip() if isinstance(description, str) else ""
        details = "; ".join(
            f"{key}: {json.dumps(value, ensure_ascii=False)}"
            for key, value in schema.items()
            if key != "type" and not (key == "description" and isinstance(value, str))
        )
        if description and details:
            description += f" ({details})"
        line = f"- `{name}` ({kind}, {'required' if name in required else 'optional'})"
        lines.append(f"{line}: {description or details}" if description or details else line)
    return "\n".join(lines)


def _json_or_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return "```json\n" + json.dumps(value, indent=2, ensure_ascii=False) + "\n```"


def _tool_result_text(content: Any) -> str:
    """ipython content: a string as is, any other JSON value serialized compactly."""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


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
            builder.text(_tool_result_text(message.content), target)
        else:
            builder.text(message.content.strip(), target)
        if message.tool_calls:
            builder.special(vocab.special_id("<|python_tag|>"), target)
            builder.text(render_tool_calls(message.tool_calls), target)
            builder.special(eom, target)
        else:
            builder.special(eot, target)
    return builder


CHATML_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
CHATML_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
"""The tool section of a ChatML system turn, as in Qwen2.5's and Hermes' chat templates."""


def chatml_system_prompt(system_message: str, tools: Sequence[ToolDoc]) -> str:
    """Text of a ChatML system turn: the message, then (with tools) one JSON schema per line inside <tools>."""
    if not tools:
        return system_message
    schemas = "".join("\n" + json.dumps(tool_schema(tool), ensure_ascii=False) for tool in tools)
    return (system_message + "\n\n" if system_message else "") + CHATML_TOOLS_HEAD + schemas + CHATML_TOOLS_TAIL


def render_chatml_tool_calls(calls: Sequence[ToolCall]) -> str:
    """Hermes-style calls: one `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call."""
    return "\n".join(
        "<tool_call>\n" + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
        + "\n</tool_call>" for call in calls
    )


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
        if message.role == "ipython":
            text = f"<tool_response>\n{_tool_result_text(message.content)}\n</tool_response>"
        elif message.tool_calls:
            content = message.content.strip()
            text = (content + "\n" if content else "") + render_chatml_tool_calls(message.tool_calls)
        else:
            text = message.content
        _chatml_turn(builder, vocab, _CHATML_ROLES.get(message.role, message.role), text,
                     target=train_on_all or message.role == "assistant", header_target=train_on_all)
    return builder


def _chatml_assistant_header(builder: _Builder, vocab: seqio.Vocabulary) -> None:
    builder.special(vocab.special_id("<|im_start|>"), False)
    builder.text("assistant\n", False)


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: the special tokens it needs, how it renders a conversation, how it opens a reply."""

    name: str
    required_tokens: tuple[str, ...]
    conversation: Callable[..., _Builder]
    assistant_header: Callable[[_Builder, seqio.Vocabulary], None]


CHAT_FORMATS: dict[str, ChatFormat] = {
    "llama3": ChatFormat(
        "llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        _conversation, lambda builder, vocab: _header(builder, vocab, "assistant", False)),
    "chatml": ChatFormat("chatml", ("<|im_start|>", "<|im_end|>"), _chatml_conversation, _chatml_assistant_header),
}
"""The chat formats by name (gin `DataConfig.chat_format`, the CLIs' --chat_format)."""


def resolve_chat_format(vocab: seqio.Vocabulary, name: str | None = None) -> ChatFormat:
    """The format `name`, else the vocabulary's `chat_format` (`vocab.forge_vocabulary`), else the first format
    whose special tokens the tokenizer has; checks the tokens exist."""
    name = name or getattr(vocab, "chat_format", None)
    special = getattr(vocab, "special_tokens", None)
    if special is None:
        raise TypeError(f"chat formats need a tokenizer with named special tokens, got {type(vocab).__name__}")
    if name is None:
        for chat_format in CHAT_FORMATS.values():
            if all(token in special for token in chat_format.required_tokens):
                return chat_format
        raise ValueError(f"the tokenizer {getattr(vocab, 'path', vocab)} has the special tokens of none of the chat "
                         f"formats {sorted(CHAT_FORMATS)}")
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}; known: {sorted(CHAT_FORMATS)}")
    chat_format = CHAT_FORMATS[name]
    missing = [token for token in chat_format.required_tokens if token not in special]
    if missing:
        raise ValueError(f"chat format {name!r} needs the special tokens {missing}, which the tokenizer "
                         f"{getattr(vocab, 'path', vocab)} lacks")
    return chat_format


def render_chat_prompt(messages: Sequence[Message], tools: Sequence[ToolDoc], vocab: seqio.Vocabulary,
                       chat_format: str | None = None) -> np.ndarray:
    """int32 tokens of a conversation followed by an open assistant header, for generation and evaluation."""
    fmt = resolve_chat_format(vocab, chat_format)
    validate_conversation(messages, tools)
    builder = fmt.conversation(messages, tools, vocab, train_on_all=False)
    fmt.assistant_header(builder, vocab)
    return np.asarray(builder.tokens, np.int32)


# --------------------------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------------------------


def _plain_document(text: str, vocab: seqio.Vocabulary) -> Example:
    builder = _start(vocab)
    builder.text(text, True)
    builder.special(vocab.eos_id, True)
    return builder.example()


def render_document(record: Record, vocab: seqio.Vocabulary, chat_format: str | None = None) -> Example:
    """Tokens and loss mask of one Forge record; conversations in `chat_format` (None: from the tokenizer).

    tool_docs / code / text: the tokenizer's prefix (BOS) + text + EOS, every token after BOS a target (any seqio
    vocabulary with bos/eos works). Trajectories: the whole chat transcript, every token after BOS a target.
    SFT: targets are exactly each assistant message's content (incl. tool calls) and its closing end-of-turn
    token (`<|eot_id|>`/`<|eom_id|>`, `<|im_end|>`), never a header; an example with no target raises
    ForgeFormatError.
    """
    if isinstance(record, ToolDoc):
        return _plain_document(tool_documentation_text(record), vocab)
    if isinstance(record, (CodeDocument, TextDocument)):
        return _plain_document(record.text, vocab)
    if isinstance(record, Trajectory):
        conversation = resolve_chat_format(vocab, chat_format).conversation
        return conversation(trajectory_messages(record), record.tools, vocab, train_on_all=True).example()
    if isinstance(record, SftExample):
        conversation = resolve_chat_format(vocab, chat_format).conversation
        example = conversation(record.messages, record.tools, vocab, train_on_all=False).example()
        if not example.loss_mask.any():
            raise ForgeFormatError(
                record.origin or "<SftExample>", "no assistant message, so the loss mask is empty", "messages"
            )
        return example
    raise TypeError(f"not a Forge record: {type(record).__name__}")
