"""Tests for hephaestus_jax.eval.tool_calls: every accepted syntax, and malformed outputs."""

import json
import random

import pytest

from hephaestus_jax.eval.tool_calls import ToolCall, parse_tool_calls

F1 = ToolCall("f", {"a": 1})
G2 = ToolCall("g", {"b": [1, 2]})


# ------------------------------------------------------------------- Llama-3.1 JSON


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f", "parameters": {"a": 1}}',
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "f", "arguments": "{\\"a\\": 1}"}',
        '{"type": "function", "name": "f", "parameters": {"a": 1}}',
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}',
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}<|eom_id|>',
        '{"name": "f", "parameters": {"a": 1}}<|eot_id|>',
        '  \n{"name": "f", "parameters": {"a": 1}}\n<|eot_id|>  ',
        '```json\n{"name": "f", "parameters": {"a": 1}}\n```',
    ],
)
def test_single_json_call_forms(text):
    assert parse_tool_calls(text) == [F1]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f", "parameters": {"a": 1}}\n{"name": "g", "parameters": {"b": [1, 2]}}',
        '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": [1, 2]}}',
        '{"name": "f", "parameters": {"a": 1}};\n{"name": "g", "arguments": {"b": [1, 2]}};',
        '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"b": [1, 2]}}]',
        '<|python_tag|>[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"b": [1, 2]}}]<|eom_id|>',
    ],
)
def test_several_json_calls_keep_their_order(text):
    assert parse_tool_calls(text) == [F1, G2]


def test_json_values_are_kept_with_their_types():
    text = json.dumps(
        {"name": "f", "parameters": {"i": 3, "x": 2.5, "s": "t", "b": False, "n": None, "l": [1, "a"], "d": {"k": -1}}}
    )
    (call,) = parse_tool_calls(text)
    assert call.arguments == {"i": 3, "x": 2.5, "s": "t", "b": False, "n": None, "l": [1, "a"], "d": {"k": -1}}
    assert type(call.arguments["i"]) is int and type(call.arguments["x"]) is float


def test_empty_json_list_is_zero_calls_not_undecodable():
    assert parse_tool_calls("[]") == []


# -------------------------------------------------------------------- Python syntax


@pytest.mark.parametrize(
    "text, expected",
    [
        ('f(a=1, b="x")', [ToolCall("f", {"a": 1, "b": "x"})]),
        ("[f(a=1), g(b=[1,2])]", [F1, G2]),
        ("(f(a=1), g(b=[1, 2]))", [F1, G2]),
        ("f(a=1)\ng(b=[1, 2])", [F1, G2]),
        ("f(a=1); g(b=[1, 2])", [F1, G2]),
        ("math.factorial(n=5)", [ToolCall("math.factorial", {"n": 5})]),
        ("a.b.c(x=True)", [ToolCall("a.b.c", {"x": True})]),
        ("<|python_tag|>f(a=1)<|eom_id|>", [F1]),
        ("get_time()", [ToolCall("get_time", {})]),
        ("[]", []),
    ],
)
def test_python_call_forms(text, expected):
    assert parse_tool_calls(text) == expected


def test_python_literals_become_json_like_values():
    text = "f(n=-3, x=+2.5, e=1e-3, t=(1, 2), d={'k': [None, False]}, s='it''s', u=None)"
    (call,) = parse_tool_calls(text)
    assert call.arguments == {
        "n": -3,
        "x": 2.5,
        "e": 0.001,
        "t": [1, 2],
        "d": {"k": [None, False]},
        "s": "its",
        "u": None,
    }
    assert isinstance(call.arguments["t"], list)  # tuples arrive as lists, as they would through JSON


# ------------------------------------------------------------------------ rejection


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "<|python_tag|><|eom_id|>",
        "The weather in Paris is sunny.",
        'Sure! Here you go: {"name": "f", "parameters": {"a": 1}}',
        '{"name": "f", "parameters": {"a": 1}} Let me know if you need more.',
        '{"name": "f", "parameters": {"a": 1',  # truncated JSON
        '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parame',  # truncated list
        '{"name": "f", "parameters": {"a": 1}}\n{"name": "g", "parameters": {"b": ',  # second call truncated
        '{"name": "f", "parameters": {"a": 1}}}',  # unbalanced
        "f(a=1",
        "[f(a=1), g(b=2)",
        "f(a=[1, 2)",
        '{"name": "f"}',  # no arguments object
        '{"name": "", "parameters": {}}',
        '{"name": "f", "parameters": [1, 2]}',
        '{"name": "f", "parameters": {}, "extra": 1}',
        '{"name": "f", "parameters": {}, "arguments": {}}',
        '{"name": "f", "parameters": {"x": NaN}}',
        '{"name": "f", "parameters": {"x": 1e999}}',
        '{"name": "f", "arguments": "{not json}"}',
        '{"function": {"name": "f", "arguments": "{}"}}',
        "[1, 2, 3]",
        '"just a string"',
        "42",
        "f(1, 2)",  # positional arguments cannot be matched to parameter names
        "f(**{'a': 1})",
        "f(a=1, a=2)",
        "f(a=x)",  # a name is not a literal
        "f(a=1 + 2)",
        "f(a=[i for i in range(3)])",
        "f(a=lambda: 1)",
        "f(a=g(b=1))",
        "f(a=f'{1}')",
        "f(a={1, 2})",
        "f(a={1: 'x'})",
        "f(a=b'bytes')",
        "f(a=1j)",
        "f(a=...)",
        "f(a=-'x')",
        "f(a=1e999)",
        "x = f(a=1)",
        "import os",
        "f(a=1)\nprint('done')\nimport os",
        "__import__('os')",
        "__import__('os').system('rm -rf /')",
        "f(a=__import__('os').system('ls'))",
        "getattr(os, 'system')(cmd='ls')",
        "f()(a=1)",
        "[f(a=1)][0]",
        "f(a=1) if True else g()",
        '```json\n{"name": "f", "parameters": {"a": 1}}',  # unterminated fence
        "f(a='\0')\0",
    ],
)
def test_malformed_or_unsafe_outputs_decode_to_none(text):
    assert parse_tool_calls(text) is None


def test_import_inside_output_is_never_executed(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the parser imported a module")

    monkeypatch.setattr("builtins.__import__", forbidden)
    assert parse_tool_calls("__import__('os').system('echo pwned')") is None


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "f(a=" + "[" * 10_000 + "]" * 10_000 + ")",
        '{"name": "f", "parameters": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001,
        "f(a=" + "9" * 100_000 + ")",
    ],
)
def test_pathological_nesting_and_sizes_decode_to_none_without_raising(text):
    assert parse_tool_calls(text) is None


def test_every_truncation_and_random_corruption_never_raises():
    """Cut valid outputs at every position, and corrupt them randomly: no exception, ever."""
    valid = [
        '<|python_tag|>{"name": "f", "parameters": {"a": [1, {"b": "x;y"}], "c": -2.5}}<|eom_id|>',
        '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "arguments": "{\\"b\\": [1, 2]}"}]',
        "[math.factorial(n=5), g(b=[1, (2, 3)], d={'k': None}, s='a\\'b')]",
    ]
    alphabet = list("{}[]()\"',;:=.-_ \n\\abcfgn0123456789") + ["<|python_tag|>", "<|eom_id|>", "__import__"]
    rng = random.Random(1234)
    for text in valid:
        assert parse_tool_calls(text)  # the uncorrupted output decodes
        for cut in range(len(text)):
            result = parse_tool_calls(text[:cut])
            assert result is None or all(isinstance(call, ToolCall) for call in result)
        for _ in range(300):
            chars = list(text)
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(chars))
                operation = rng.choice(("insert", "delete", "replace"))
                if operation == "insert":
                    chars.insert(position, rng.choice(alphabet))
                elif operation == "delete":
                    del chars[position]
                else:
                    chars[position] = rng.choice(alphabet)
            result = parse_tool_calls("".join(chars))
            assert result is None or all(isinstance(call, ToolCall) for call in result)


def test_truncated_multi_call_output_never_yields_the_partial_prefix_plus_garbage():
    text = '{"name": "f", "parameters": {"a": 1}}\n{"name": "g", "parameters": {"b": [1, 2]}}'
    decoded = {cut: parse_tool_calls(text[:cut]) for cut in range(len(text) + 1)}
    complete_first = text.index("\n")
    for cut, result in decoded.items():
        if result is None:
            continue
        # Whatever decodes is exactly the calls that were complete at the cut: never a half call.
        assert result in ([F1], [F1, G2])
        assert cut >= complete_first
