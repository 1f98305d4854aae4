"""The text pieces of chats that every renderer shares: tool schemas, tool calls and tool results, the system
prompts with tools of the Llama-3.1 and ChatML (Hermes) conventions, and tool documentation as a document."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hephaestus_jax.data.forge import Message, ToolCall, ToolDoc

KNOWLEDGE_CUTOFF = "December 2023"
TODAY_DATE = "26 Jul 2024"
"""Fixed date in the system header (the default `date_string` of Meta's Llama-3.1 chat template)."""

TOOL_INSTRUCTIONS = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
"""Meta's Llama-3.1 instruction that precedes the tool definitions in the system prompt."""


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


def tool_result_text(content: Any) -> str:
    """ipython content: a string as is, any other JSON value serialized compactly."""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


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


def chatml_text(message: Message) -> str:
    """A message's ChatML turn text in the Hermes convention: calls in `<tool_call>` tags after the content, tool
    results inside `<tool_response>` tags."""
    if message.role == "ipython":
        return f"<tool_response>\n{tool_result_text(message.content)}\n</tool_response>"
    if message.tool_calls:
        content = message.content.strip()
        return (content + "\n" if content else "") + render_chatml_tool_calls(message.tool_calls)
    return message.content
