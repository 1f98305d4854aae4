"""Forge records -> tokens and loss masks, in the Llama-3.1 chat format with JSON tool calling.

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
from collections.abc import Sequence
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
from hephaestus_jax.data.vocab import Llama3Vocabulary

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


def _require_llama3(vocab: seqio.Vocabulary) -> Llama3Vocabulary:
    if not isinstance(vocab, Llama3Vocabulary):
        raise TypeError(f"the Llama-3.1 chat format needs a Llama3Vocabulary, got {type(vocab).__name__}")
    return vocab


def _header(builder: _Builder, vocab: Llama3Vocabulary, role: str, target: bool) -> None:
    builder.special(vocab.start_header_id, target)
    builder.text(role, target)
    builder.special(vocab.end_header_id, target)
    builder.text("\n\n", target)


def _conversation(
    messages: Sequence[Message], tools: Sequence[ToolDoc], vocab: Llama3Vocabulary, *, train_on_all: bool
) -> _Builder:
    """BOS, the system turn and every message; assistant messages are always targets, the rest if train_on_all."""
    builder = _Builder(vocab)
    has_system = bool(messages) and messages[0].role == "system"
    builder.special(vocab.bos_id, False)
    _header(builder, vocab, "system", train_on_all)
    builder.text(system_prompt(messages[0].content if has_system else "", tools), train_on_all)
    builder.special(vocab.eot_id, train_on_all)
    for message in messages[1:] if has_system else messages:
        target = train_on_all or message.role == "assistant"
        _header(builder, vocab, message.role, train_on_all)
        if message.role == "ipython":
            builder.text(_tool_result_text(message.content), target)
        else:
            builder.text(message.content.strip(), target)
        if message.tool_calls:
            builder.special(vocab.python_tag_id, target)
            builder.text(render_tool_calls(message.tool_calls), target)
            builder.special(vocab.eom_id, target)
        else:
            builder.special(vocab.eot_id, target)
    return builder


def render_chat_prompt(messages: Sequence[Message], tools: Sequence[ToolDoc], vocab: seqio.Vocabulary) -> np.ndarray:
    """int32 tokens of a conversation followed by an open assistant header, for generation and evaluation."""
    llama3 = _require_llama3(vocab)
    validate_conversation(messages, tools)
    builder = _conversation(messages, tools, llama3, train_on_all=False)
    _header(builder, llama3, "assistant", False)
    return np.asarray(builder.tokens, np.int32)


# --------------------------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------------------------


def _plain_document(text: str, vocab: seqio.Vocabulary) -> Example:
    builder = _Builder(vocab)
    builder.special(vocab.bos_id, False)
    builder.text(text, True)
    builder.special(vocab.eos_id, True)
    return builder.example()


def render_document(record: Record, vocab: seqio.Vocabulary) -> Example:
    """Tokens and loss mask of one Forge record.

    tool_docs / code / text: BOS + text + `<|end_of_text|>`, every token after BOS a target (any seqio vocabulary
    with bos/eos works). Trajectories: the whole chat transcript, every token after BOS a target, ending with the
    final `<|eot_id|>`. SFT: targets are exactly each assistant message's content (incl. `<|python_tag|>` and tool
    calls) and its closing `<|eot_id|>`/`<|eom_id|>`; an example with no target raises ForgeFormatError.
    """
    if isinstance(record, ToolDoc):
        return _plain_document(tool_documentation_text(record), vocab)
    if isinstance(record, (CodeDocument, TextDocument)):
        return _plain_document(record.text, vocab)
    if isinstance(record, Trajectory):
        return _conversation(
            trajectory_messages(record), record.tools, _require_llama3(vocab), train_on_all=True
        ).example()
    if isinstance(record, SftExample):
        example = _conversation(record.messages, record.tools, _require_llama3(vocab), train_on_all=False).example()
        if not example.loss_mask.any():
            raise ForgeFormatError(
                record.origin or "<SftExample>", "no assistant message, so the loss mask is empty", "messages"
            )
        return example
    raise TypeError(f"not a Forge record: {type(record).__name__}")
