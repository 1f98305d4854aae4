"""Hephaestus-Forge records: schemas, validation and reading of JSONL (optionally gzip) files.

One file holds one component (see `COMPONENTS`); every line is one JSON object. A bad line raises
`ForgeFormatError("path:line: what is wrong (field)")`, or is skipped and counted when the reader is told to.
The format is documented with examples in docs/data_format.md; rendering to tokens lives in chat_format.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union

from hephaestus_jax.json_lines import BadLine, ReadStats, decode_object, json_type, read_lines

logger = logging.getLogger(__name__)

COMPONENTS = ("tool_docs", "trajectories", "code", "text", "sft")
"""Forge components; each file holds records of exactly one of them."""

ROLES = ("system", "user", "assistant", "ipython")
"""Chat roles; `ipython` carries tool results (Llama-3.1's name for the tool role)."""


class ForgeFormatError(BadLine):
    """A record that does not follow the Forge format; str() is "origin: problem (field)"."""

    def __init__(self, origin: str, problem: str, field: str | None = None):
        self.origin = origin
        self.field = field
        super().__init__(origin, problem + (f" ({field})" if field else ""))
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.origin, self.problem, self.field))


# --------------------------------------------------------------------------------------------------------------
# Schemas. `origin` ("path:line") is where a record came from; it names the record in errors and is not compared.
# `meta` is an optional free-form JSON object accepted on every record and kept as is.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolDoc:
    """Documentation of one tool (function); `parameters` is a JSON-schema object (type=object)."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    returns: str | Mapping[str, Any] | None = None
    examples: tuple[Any, ...] = ()
    source: str | None = None
    meta: Mapping[str, Any] | None = None
    origin: str = field(default="", compare=False, repr=False)

    @property
    def required_parameters(self) -> tuple[str, ...]:
        return tuple(self.parameters.get("required", ()))


@dataclass(frozen=True)
class ToolCall:
    """A call of the tool `name` with keyword `arguments`."""

    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class TrajectoryStep:
    """One step of a function-calling trajectory: a thought and/or a call, then the call's observation (None: none)."""

    thought: str | None = None
    call: ToolCall | None = None
    observation: Any = None


@dataclass(frozen=True)
class Trajectory:
    """A user query solved with tools: steps of thought/call/observation, then the final answer."""

    query: str
    tools: tuple[ToolDoc, ...]
    steps: tuple[TrajectoryStep, ...]
    final_answer: str
    id: str | None = None
    meta: Mapping[str, Any] | None = None
    origin: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class CodeDocument:
    text: str
    language: str
    path: str | None = None
    license: str | None = None
    meta: Mapping[str, Any] | None = None
    origin: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class TextDocument:
    text: str
    source: str | None = None
    meta: Mapping[str, Any] | None = None
    origin: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Message:
    """A chat message. `content` is a string, except for ipython (tool result) messages where it is any JSON value."""

    role: str
    content: Any = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class SftExample:
    """A conversation for supervised fine-tuning; the loss is on assistant messages only."""

    messages: tuple[Message, ...]
    tools: tuple[ToolDoc, ...] = ()
    meta: Mapping[str, Any] | None = None
    origin: str = field(default="", compare=False, repr=False)


Record = Union[ToolDoc, Trajectory, CodeDocument, TextDocument, SftExample]


# --------------------------------------------------------------------------------------------------------------
# Field access with errors that name the field.
# --------------------------------------------------------------------------------------------------------------

_ABSENT = object()


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _Fields:
    """Typed access to the fields of one JSON object, raising ForgeFormatError that names the field."""

    def __init__(self, value: Any, origin: str, path: str, allowed: Sequence[str]):
        self.origin, self.path = origin, path
        if not isinstance(value, dict):
            self.fail(f"expected a JSON object, got {json_type(value)}", path or None)
        unknown = [key for key in value if key not in allowed]
        if unknown:
            self.fail(f"unknown field; expected only {', '.join(allowed)}", _join(path, unknown[0]))
        self.value = value

    def fail(self, problem: str, field_path: str | None) -> NoReturn:
        raise ForgeFormatError(self.origin, problem, field_path)

    def field(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, expected: str | tuple[str, ...], *, required: bool = True) -> Any:
        """The value of `key` if it has one of the JSON types; None if optional and absent or null."""
        value = self.value.get(key, _ABSENT)
        if value is _ABSENT or (value is None and not required):
            if required:
                self.fail("missing required field", self.field(key))
            return None
        types = (expected,) if isinstance(expected, str) else expected
        if json_type(value) not in types:
            self.fail(f"expected {' or '.join(types)}, got {json_type(value)}", self.field(key))
        return value

    def text(self, key: str, *, required: bool = True, non_empty: bool = False) -> str | None:
        value = self.get(key, "string", required=required)
        if non_empty and value is not None and not value.strip():
            self.fail("must not be empty", self.field(key))
        return value

    def items(self, key: str, *, required: bool = True) -> list[tuple[str, Any]]:
        """(field path, element) for each element of an array field; [] if optional and absent."""
        values = self.get(key, "array", required=required) or []
        return [(_join(self.field(key), index), item) for index, item in enumerate(values)]

    def meta(self) -> Mapping[str, Any] | None:
        return self.get("meta", "object", required=False)


# --------------------------------------------------------------------------------------------------------------
# Parsers, one per component.
# --------------------------------------------------------------------------------------------------------------


def _parse_parameters(fields: _Fields) -> Mapping[str, Any]:
    schema = fields.get("parameters", "object")
    path = fields.field("parameters")
    if schema.get("type") != "object":
        fields.fail('must be a JSON schema with "type": "object"', _join(path, "type"))
    properties = schema.get("properties", _ABSENT)
    if properties is _ABSENT:
        fields.fail("missing required field", _join(path, "properties"))
    if not isinstance(properties, dict):
        fields.fail("expected an object mapping parameter names to JSON schemas", _join(path, "properties"))
    for name, property_schema in properties.items():
        if not isinstance(property_schema, dict):
            fields.fail(
                f"expected a JSON schema object, got {json_type(property_schema)}",
                _join(_join(path, "properties"), name),
            )
    required = schema.get("required", [])
    if not isinstance(required, list):
        fields.fail(f"expected array, got {json_type(required)}", _join(path, "required"))
    for index, name in enumerate(required):
        if not isinstance(name, str) or name not in properties:
            fields.fail(f"required parameter {name!r} is not in properties", _join(_join(path, "required"), index))
    if len(set(required)) != len(required):
        fields.fail("lists a parameter twice", _join(path, "required"))
    return schema


def parse_tool_doc(value: Any, origin: str, path: str = "") -> ToolDoc:
    """A tool documentation object (a tool_docs record, or an element of a `tools` list)."""
    fields = _Fields(
        value, origin, path, ("name", "description", "parameters", "returns", "examples", "source", "meta")
    )
    return ToolDoc(
        name=fields.text("name", non_empty=True),
        description=fields.text("description"),
        parameters=_parse_parameters(fields),
        returns=fields.get("returns", ("string", "object"), required=False),
        examples=tuple(fields.get("examples", "array", required=False) or ()),
        source=fields.text("source", required=False),
        meta=fields.meta(),
        origin=origin,
    )


def _parse_tools(fields: _Fields, *, required: bool) -> tuple[ToolDoc, ...]:
    tools = tuple(parse_tool_doc(item, fields.origin, path) for path, item in fields.items("tools", required=required))
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if tool.name in seen:
            fields.fail(f"tool {tool.name!r} is defined twice", _join(fields.field("tools"), index))
        seen.add(tool.name)
    return tools


def _parse_tool_call(value: Any, origin: str, path: str) -> ToolCall:
    fields = _Fields(value, origin, path, ("name", "arguments"))
    return ToolCall(name=fields.text("name", non_empty=True), arguments=fields.get("arguments", "object"))


def _check_call(call: ToolCall, tools: Mapping[str, ToolDoc], origin: str, path: str) -> None:
    """A call must name a tool in `tools`, give its required arguments and no undeclared ones."""
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        raise ForgeFormatError(
            origin, f"calls tool {call.name!r}, which is not in tools (tools: {known})", _join(path, "name")
        )
    missing = [name for name in tool.required_parameters if name not in call.arguments]
    if missing:
        raise ForgeFormatError(
            origin, f"missing required argument {missing[0]!r} of tool {call.name!r}", _join(path, "arguments")
        )
    if not tool.parameters.get("additionalProperties", False):
        declared = tool.parameters["properties"]
        undeclared = [name for name in call.arguments if name not in declared]
        if undeclared:
            raise ForgeFormatError(
                origin, f"argument {undeclared[0]!r} is not a parameter of tool {call.name!r}", _join(path, "arguments")
            )


def _parse_step(value: Any, origin: str, path: str, tools: Mapping[str, ToolDoc]) -> TrajectoryStep:
    fields = _Fields(value, origin, path, ("thought", "call", "observation"))
    thought = fields.text("thought", required=False)
    call_value = fields.get("call", "object", required=False)
    call = None if call_value is None else _parse_tool_call(call_value, origin, fields.field("call"))
    observation = fields.value.get("observation")
    if call is None and not (thought and thought.strip()):
        fields.fail("a step needs a thought or a call", path)
    if call is None and observation is not None:
        fields.fail("an observation needs a call in the same step", fields.field("observation"))
    if call is not None:
        _check_call(call, tools, origin, fields.field("call"))
    return TrajectoryStep(thought=thought, call=call, observation=observation)


def parse_trajectory(value: Any, origin: str) -> Trajectory:
    fields = _Fields(value, origin, "", ("id", "query", "tools", "steps", "final_answer", "meta"))
    record_id = fields.get("id", ("string", "integer"), required=False)
    query = fields.text("query", non_empty=True)
    tools = _parse_tools(fields, required=True)
    by_name = {tool.name: tool for tool in tools}
    steps = tuple(_parse_step(item, origin, path, by_name) for path, item in fields.items("steps"))
    return Trajectory(
        query=query,
        tools=tools,
        steps=steps,
        final_answer=fields.text("final_answer", non_empty=True),
        id=None if record_id is None else str(record_id),
        meta=fields.meta(),
        origin=origin,
    )


def parse_code(value: Any, origin: str) -> CodeDocument:
    fields = _Fields(value, origin, "", ("text", "language", "path", "license", "meta"))
    return CodeDocument(
        text=fields.text("text", non_empty=True),
        language=fields.text("language", non_empty=True),
        path=fields.text("path", required=False),
        license=fields.text("license", required=False),
        meta=fields.meta(),
        origin=origin,
    )


def parse_text(value: Any, origin: str) -> TextDocument:
    fields = _Fields(value, origin, "", ("text", "source", "meta"))
    return TextDocument(
        text=fields.text("text", non_empty=True),
        source=fields.text("source", required=False),
        meta=fields.meta(),
        origin=origin,
    )


def _parse_message(value: Any, origin: str, path: str) -> Message:
    fields = _Fields(value, origin, path, ("role", "content", "tool_calls"))
    role = fields.text("role")
    if role not in ROLES:
        hint = " (tool results use the role ipython)" if role == "tool" else ""
        fields.fail(f"unknown role {role!r}; expected one of {', '.join(ROLES)}{hint}", fields.field("role"))
    calls = tuple(
        _parse_tool_call(item, origin, item_path) for item_path, item in fields.items("tool_calls", required=False)
    )
    if calls and role != "assistant":
        fields.fail("only assistant messages carry tool_calls", fields.field("tool_calls"))
    if role == "ipython":
        if "content" not in fields.value:
            fields.fail("missing required field", fields.field("content"))
        return Message(role=role, content=fields.value["content"])
    content = fields.text("content", required=role != "assistant") or ""
    if role == "assistant" and not calls and not content.strip():
        fields.fail("an assistant message needs content or tool_calls", fields.field("content"))
    return Message(role=role, content=content, tool_calls=calls)


def validate_conversation(
    messages: Sequence[Message], tools: Sequence[ToolDoc], origin: str = "<conversation>"
) -> None:
    """Checks the order of messages and every tool call against `tools`; raises ForgeFormatError.

    A system message may only come first; an ipython message must follow an assistant message with tool calls
    (or another ipython message, for parallel calls); each call must match a tool in `tools`.
    """
    by_name = {tool.name: tool for tool in tools}
    previous: Message | None = None
    for index, message in enumerate(messages):
        path = _join("messages", index)
        if message.role not in ROLES:
            raise ForgeFormatError(origin, f"unknown role {message.role!r}", _join(path, "role"))
        if message.role != "ipython" and not isinstance(message.content, str):
            raise ForgeFormatError(
                origin, f"expected string, got {json_type(message.content)}", _join(path, "content")
            )
        if message.role == "system" and index != 0:
            raise ForgeFormatError(origin, "a system message may only be the first message", _join(path, "role"))
        if message.role == "ipython" and not (
            previous is not None
            and (previous.role == "ipython" or (previous.role == "assistant" and previous.tool_calls))
        ):
            raise ForgeFormatError(origin, "a tool result must follow an assistant message with tool_calls", path)
        for call_index, call in enumerate(message.tool_calls):
            _check_call(call, by_name, origin, _join(_join(path, "tool_calls"), call_index))
        previous = message


def parse_sft(value: Any, origin: str) -> SftExample:
    fields = _Fields(value, origin, "", ("messages", "tools", "meta"))
    messages = tuple(_parse_message(item, origin, path) for path, item in fields.items("messages"))
    if not messages:
        fields.fail("must not be empty", "messages")
    tools = _parse_tools(fields, required=False)
    validate_conversation(messages, tools, origin)
    if not any(message.role == "assistant" for message in messages):
        fields.fail("no assistant message, so nothing to train on", "messages")
    return SftExample(messages=messages, tools=tools, meta=fields.meta(), origin=origin)


_PARSERS = {
    "tool_docs": parse_tool_doc,
    "trajectories": parse_trajectory,
    "code": parse_code,
    "text": parse_text,
    "sft": parse_sft,
}


def parse_record(value: Any, component: str, origin: str) -> Record:
    """Validates one decoded JSON value as a record of `component`; `origin` (e.g. "path:line") names it in errors."""
    try:
        parser = _PARSERS[component]
    except KeyError:
        raise ValueError(f"unknown Forge component {component!r}; expected one of {', '.join(COMPONENTS)}") from None
    return parser(value, origin)


def parse_json_record(line: str, component: str, origin: str) -> Record:
    """Decodes one JSON line (NaN and Infinity are not JSON) and validates it as a record of `component`."""
    return parse_record(decode_object(line, origin, allow_nan=False, error=ForgeFormatError), component, origin)


def trajectory_messages(trajectory: Trajectory) -> tuple[Message, ...]:
    """The trajectory as a conversation: the query, one assistant message per call (its thought first, then the
    call) followed by an ipython message with the observation, and the final answer. Thoughts of steps without a
    call are joined (blank line) to the next assistant message, so every assistant turn ends in a call or the answer.
    """
    messages = [Message("user", trajectory.query)]
    pending_thoughts: list[str] = []
    for step in trajectory.steps:
        if step.thought and step.thought.strip():
            pending_thoughts.append(step.thought.strip())
        if step.call is None:
            continue
        messages.append(Message("assistant", "\n\n".join(pending_thoughts), (step.call,)))
        pending_thoughts = []
        if step.observation is not None:
            messages.append(Message("ipython", step.observation))
    messages.append(Message("assistant", "\n\n".join([*pending_thoughts, trajectory.final_answer.strip()])))
    return tuple(messages)


# --------------------------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------------------------


class RecordReader:
    """Iterates the records of one Forge JSONL file (local or gs://, gzip detected from its content).

    Blank lines are ignored. A bad line raises ForgeFormatError, or with `skip_bad_records` is skipped: the first
    `json_lines.MAX_LOGGED_SKIPS` are logged with their error, a summary is logged at the end, and `num_skipped`
    counts them. Counters are reset at the start of each iteration.
    """

    def __init__(self, path: str | os.PathLike, component: str, *, skip_bad_records: bool = False):
        if component not in COMPONENTS:
            raise ValueError(f"unknown Forge component {component!r}; expected one of {', '.join(COMPONENTS)}")
        self.path = os.fspath(path)
        self.component = component
        self.skip_bad_records = skip_bad_records
        self.num_records = 0
        self.stats = ReadStats()

    @property
    def num_skipped(self) -> int:
        return self.stats.bad_records

    def __iter__(self) -> Iterator[Record]:
        self.num_records, self.stats = 0, ReadStats()
        for line in read_lines(self.path, skip_bad_records=self.skip_bad_records, stats=self.stats,
                               error=ForgeFormatError):
            try:
                record = parse_json_record(line.text, self.component, line.where)
            except ForgeFormatError as err:
                self.stats.skip_or_raise(err, self.skip_bad_records)
                continue
            self.num_records += 1
            yield record
        if self.num_skipped:
            logger.warning(
                "%s: skipped %d bad %s records, kept %d", self.path, self.num_skipped, self.component, self.num_records
            )


def read_records(path: str | os.PathLike, component: str, *, skip_bad_records: bool = False) -> RecordReader:
    """Records of `component` in the JSONL(.gz) file at `path`: iterate the result; after iterating, its
    `num_records` and `num_skipped` say how many records were read and how many bad lines were skipped."""
    return RecordReader(path, component, skip_bad_records=skip_bad_records)
