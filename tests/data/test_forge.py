"""Tests for hephaestus_jax.data.forge: record schemas, validation errors with file:line, reading files."""

import gzip
import json
import logging
import pickle

import pytest

from hephaestus_jax import json_lines
from hephaestus_jax.data import forge
from hephaestus_jax.data.forge import (
    CodeDocument,
    ForgeFormatError,
    Message,
    SftExample,
    TextDocument,
    ToolCall,
    ToolDoc,
    Trajectory,
    TrajectoryStep,
)

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"],
    },
}
WEATHER_TOOL_DOC = ToolDoc(
    name="get_weather",
    description="Current weather for a city.",
    parameters=WEATHER_TOOL["parameters"],
)

GOOD = {
    "tool_docs": {
        **WEATHER_TOOL,
        "returns": "A JSON object with the temperature.",
        "examples": ["get_weather(city='Oslo')"],
        "source": "api.example.com",
    },
    "trajectories": {
        "id": 7,
        "query": "How warm is Oslo?",
        "tools": [WEATHER_TOOL],
        "steps": [
            {"thought": "Look it up."},
            {
                "thought": "Call the API.",
                "call": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                "observation": {"temp": 3},
            },
        ],
        "final_answer": "3 degrees.",
    },
    "code": {"text": "print('hi')\n", "language": "python", "path": "hi.py", "license": "MIT"},
    "text": {"text": "Some prose.", "source": "wiki", "meta": {"lang": "en"}},
    "sft": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Oslo?"},
            {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
            {"role": "ipython", "content": {"temp": 3}},
            {"role": "assistant", "content": "3 degrees."},
        ],
        "tools": [WEATHER_TOOL],
    },
}

EXPECTED = {
    "tool_docs": ToolDoc(
        name="get_weather",
        description="Current weather for a city.",
        parameters=WEATHER_TOOL["parameters"],
        returns="A JSON object with the temperature.",
        examples=("get_weather(city='Oslo')",),
        source="api.example.com",
    ),
    "trajectories": Trajectory(
        query="How warm is Oslo?",
        tools=(WEATHER_TOOL_DOC,),
        steps=(
            TrajectoryStep(thought="Look it up."),
            TrajectoryStep(
                thought="Call the API.", call=ToolCall("get_weather", {"city": "Oslo"}), observation={"temp": 3}
            ),
        ),
        final_answer="3 degrees.",
        id="7",
    ),
    "code": CodeDocument(text="print('hi')\n", language="python", path="hi.py", license="MIT"),
    "text": TextDocument(text="Some prose.", source="wiki", meta={"lang": "en"}),
    "sft": SftExample(
        messages=(
            Message("system", "Be brief."),
            Message("user", "Oslo?"),
            Message("assistant", "", (ToolCall("get_weather", {"city": "Oslo"}),)),
            Message("ipython", {"temp": 3}),
            Message("assistant", "3 degrees."),
        ),
        tools=(WEATHER_TOOL_DOC,),
    ),
}


def write_lines(path, lines, *, compress=False):
    """Writes JSONL: dicts are serialized, bytes/str lines written as given."""
    raw = b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
        for line in lines
    )
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return str(path)


def read_all(path, component, **kwargs):
    return list(forge.read_records(path, component, **kwargs))


@pytest.mark.parametrize("component", forge.COMPONENTS)
@pytest.mark.parametrize("compress", [False, True])
def test_good_records_parse_to_expected_dataclasses(tmp_path, component, compress):
    path = write_lines(
        tmp_path / f"{component}.jsonl{'.gz' if compress else ''}",
        [GOOD[component], "", GOOD[component]],
        compress=compress,
    )
    reader = forge.read_records(path, component)
    records = list(reader)
    assert records == [EXPECTED[component], EXPECTED[component]]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3"]
    assert reader.num_records == 2 and reader.num_skipped == 0


def test_gzip_is_detected_from_content_not_name(tmp_path):
    path = write_lines(tmp_path / "text.jsonl", [GOOD["text"]], compress=True)
    assert read_all(path, "text") == [EXPECTED["text"]]


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


def _sft_with(*messages, tools=(WEATHER_TOOL,)):
    return {"messages": list(messages), "tools": list(tools)}


USER = {"role": "user", "content": "Oslo?"}
ANSWER = {"role": "assistant", "content": "Cold."}
CALL = {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}

BAD_RECORDS = [
    ("text", "{not json", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    ("text", '{"text": NaN}', "invalid JSON: NaN is not valid JSON"),
    ("text", "[1, 2]", "expected a JSON object, got array"),
    ("text", {"source": "x"}, "missing required field (text)"),
    ("text", {"text": 5}, "expected string, got integer (text)"),
    ("text", {"text": "  "}, "must not be empty (text)"),
    ("text", {"text": "x", "url": "y"}, "unknown field; expected only text, source, meta (url)"),
    ("code", _without(GOOD["code"], "language"), "missing required field (language)"),
    (
        "tool_docs",
        {**WEATHER_TOOL, "parameters": {"type": "array"}},
        'must be a JSON schema with "type": "object" (parameters.type)',
    ),
    ("tool_docs", {**WEATHER_TOOL, "parameters": {"type": "object"}}, "missing required field (parameters.properties)"),
    (
        "tool_docs",
        {**WEATHER_TOOL, "parameters": {**WEATHER_TOOL["parameters"], "required": ["city", "country"]}},
        "required parameter 'country' is not in properties (parameters.required[1])",
    ),
    ("tool_docs", {**WEATHER_TOOL, "examples": "x"}, "expected array, got string (examples)"),
    ("trajectories", _without(GOOD["trajectories"], "query"), "missing required field (query)"),
    (
        "trajectories",
        {**GOOD["trajectories"], "tools": [WEATHER_TOOL, WEATHER_TOOL]},
        "tool 'get_weather' is defined twice (tools[1])",
    ),
    (
        "trajectories",
        {**GOOD["trajectories"], "steps": [{"call": {"name": "get_time", "arguments": {}}}]},
        "calls tool 'get_time', which is not in tools (tools: get_weather) (steps[0].call.name)",
    ),
    (
        "trajectories",
        {**GOOD["trajectories"], "steps": [{"call": {"name": "get_weather", "arguments": {"unit": "c"}}}]},
        "missing required argument 'city' of tool 'get_weather' (steps[0].call.arguments)",
    ),
    (
        "trajectories",
        {**GOOD["trajectories"], "steps": [{"call": {"name": "get_weather", "arguments": {"city": "Oslo", "day": 1}}}]},
        "argument 'day' is not a parameter of tool 'get_weather' (steps[0].call.arguments)",
    ),
    (
        "trajectories",
        {**GOOD["trajectories"], "steps": [{"call": {"name": "get_weather", "arguments": "city=Oslo"}}]},
        "expected object, got string (steps[0].call.arguments)",
    ),
    (
        "trajectories",
        {**GOOD["trajectories"], "steps": [{"observation": "3"}]},
        "a step needs a thought or a call (steps[0])",
    ),
    (
        "trajectories",
        {**GOOD["trajectories"], "steps": [{"thought": "hm", "observation": "3"}]},
        "an observation needs a call in the same step (steps[0].observation)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "tool", "content": "3"}),
        "unknown role 'tool'; expected one of system, user, assistant, ipython (tool results use the role ipython) (messages[1].role)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "robot", "content": "3"}),
        "unknown role 'robot'; expected one of system, user, assistant, ipython (messages[1].role)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "assistant", "tool_calls": [{"name": "search", "arguments": {}}]}),
        "calls tool 'search', which is not in tools (tools: get_weather) (messages[1].tool_calls[0].name)",
    ),
    (
        "sft",
        _sft_with(USER, CALL, tools=()),
        "calls tool 'get_weather', which is not in tools (tools: none) (messages[1].tool_calls[0].name)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "assistant", "content": " "}),
        "an assistant message needs content or tool_calls (messages[1].content)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "user", "content": "x", "tool_calls": []}),
        "no assistant message, so nothing to train on (messages)",
    ),
    (
        "sft",
        _sft_with({**USER, "tool_calls": CALL["tool_calls"]}, ANSWER),
        "only assistant messages carry tool_calls (messages[0].tool_calls)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "system", "content": "late"}, ANSWER),
        "a system message may only be the first message (messages[1].role)",
    ),
    (
        "sft",
        _sft_with(USER, {"role": "ipython", "content": "3"}, ANSWER),
        "a tool result must follow an assistant message with tool_calls (messages[1])",
    ),
    ("sft", _sft_with(USER, CALL, {"role": "ipython"}, ANSWER), "missing required field (messages[2].content)"),
    (
        "sft",
        _sft_with(USER, {"role": "user", "content": ["a"]}, ANSWER),
        "expected string, got array (messages[1].content)",
    ),
    ("sft", {"messages": []}, "must not be empty (messages)"),
    ("sft", {"messages": [USER, ANSWER], "tools": {"name": "x"}}, "expected array, got object (tools)"),
]


@pytest.mark.parametrize("component,bad_line,expected", BAD_RECORDS)
def test_bad_record_error_names_file_line_and_field(tmp_path, component, bad_line, expected):
    path = write_lines(tmp_path / "data.jsonl", [GOOD[component], bad_line, GOOD[component]])
    with pytest.raises(ForgeFormatError) as error:
        read_all(path, component)
    assert str(error.value) == f"{path}:2: {expected}"
    assert error.value.origin == f"{path}:2"


def test_invalid_utf8_reports_byte_offset(tmp_path):
    first = json.dumps(GOOD["text"]).encode() + b"\n"
    second = b'{"text": "caf\xe9"}\n'  # Latin-1 e-acute: not UTF-8
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(first + second)
    expected_offset = len(first) + second.index(b"\xe9")
    with pytest.raises(ForgeFormatError) as error:
        read_all(path, "text")
    assert str(error.value) == f"{path}:2: invalid UTF-8: byte 0xe9 at byte offset {expected_offset} of the file"


def test_invalid_utf8_in_gzip_reports_decompressed_offset(tmp_path):
    path = tmp_path / "latin1.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "\xff"}\n'))
    with pytest.raises(
        ForgeFormatError, match=r":2: invalid UTF-8: byte 0xff at byte offset 25 of the decompressed stream"
    ):
        read_all(path, "text")


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n' * 100)[:-8])  # drop the CRC/size trailer
    records = []
    with pytest.raises(ForgeFormatError, match="broken.jsonl.gz:101: cannot read the file"):
        for record in forge.read_records(path, "text"):
            records.append(record)
    assert len(records) == 100


def test_skip_mode_skips_counts_and_logs_bad_lines(tmp_path, caplog):
    lines = [GOOD["code"], "{oops", GOOD["code"], {"text": "x"}, b'{"text": "\xff", "language": "c"}', GOOD["code"]]
    path = write_lines(tmp_path / "code.jsonl", lines)
    reader = forge.read_records(path, "code", skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="hephaestus_jax.data.forge"):
        records = list(reader)
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert reader.num_records == 3 and reader.num_skipped == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}:2: invalid JSON" in m for m in messages)
    assert any(f"{path}:4: missing required field (language)" in m for m in messages)
    assert any(f"{path}:5: invalid UTF-8" in m for m in messages)
    assert messages[-1] == f"{path}: skipped 3 bad code records, kept 3"
    # Iterating again starts the counts afresh.
    assert len(list(reader)) == 3 and reader.num_skipped == 3


def test_skip_mode_logs_only_the_first_bad_lines_but_counts_all(tmp_path, caplog):
    count = json_lines.MAX_LOGGED_SKIPS + 5
    path = write_lines(tmp_path / "bad.jsonl", ["{"] * count + [GOOD["text"]])
    reader = forge.read_records(path, "text", skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="hephaestus_jax.data.forge"):
        assert len(list(reader)) == 1
    assert reader.num_skipped == count
    assert sum("skipping bad record" in r.getMessage() for r in caplog.records) == json_lines.MAX_LOGGED_SKIPS


def test_unknown_component_is_rejected():
    with pytest.raises(ValueError, match="unknown Forge component 'docs'"):
        forge.read_records("x.jsonl", "docs")
    with pytest.raises(ValueError, match="unknown Forge component"):
        forge.parse_record({}, "docs", "x")


def test_forge_format_error_survives_pickling_for_worker_processes():
    error = ForgeFormatError("f.jsonl:3", "missing required field", "query")
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == "f.jsonl:3: missing required field (query)"
    assert (restored.origin, restored.problem, restored.field) == ("f.jsonl:3", "missing required field", "query")


def test_additional_properties_allows_undeclared_arguments():
    tool = {**WEATHER_TOOL, "parameters": {**WEATHER_TOOL["parameters"], "additionalProperties": True}}
    record = forge.parse_record(
        _sft_with(
            USER,
            {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "day": 1}}]},
            tools=[tool],
        ),
        "sft",
        "mem:1",
    )
    assert record.messages[1].tool_calls[0].arguments == {"city": "Oslo", "day": 1}


def test_trajectory_messages_attach_thoughts_to_the_next_assistant_turn():
    trajectory = forge.parse_record(GOOD["trajectories"], "trajectories", "mem:1")
    assert forge.trajectory_messages(trajectory) == (
        Message("user", "How warm is Oslo?"),
        Message("assistant", "Look it up.\n\nCall the API.", (ToolCall("get_weather", {"city": "Oslo"}),)),
        Message("ipython", {"temp": 3}),
        Message("assistant", "3 degrees."),
    )
    thinking_at_end = forge.parse_record(
        {**GOOD["trajectories"], "steps": [{"thought": "I know this."}]}, "trajectories", "mem:2"
    )
    assert forge.trajectory_messages(thinking_at_end)[-1] == Message("assistant", "I know this.\n\n3 degrees.")


def test_parse_json_record_accepts_a_single_line():
    record = forge.parse_json_record(json.dumps(GOOD["sft"]), "sft", "shard-0:17")
    assert record == EXPECTED["sft"] and record.origin == "shard-0:17"
