"""Parse a model's raw text output into tool calls, safely and conservatively.

Accepted forms (the whole output must be one of them, after stripping Llama-3.1
special tokens ``<|python_tag|>`` before and ``<|eot_id|>``/``<|eom_id|>`` after (ChatML:
``<|im_end|>``), the Hermes/ChatML wrappers ``<tool_call>...</tool_call>`` around each
call, and one optional Markdown code fence around everything):

* Llama-3.1 JSON: ``{"name": "f", "parameters": {...}}`` (``"arguments"`` is accepted
  for ``"parameters"``, as is a JSON-encoded string of the arguments object, and an
  extra ``"type": "function"`` key);
* several such objects, separated by whitespace/newlines and/or ``;``;
* a JSON list of such objects (``[]`` decodes to zero calls);
* Python call syntax: ``f(a=1, b="x")``, ``[f(a=1), g(b=[1, 2])]``, dotted names
  ``math.factorial(n=5)``, several calls on separate lines or separated by ``;``.
  Arguments must be keyword arguments whose values are literals (numbers, negative
  numbers, strings, booleans, None, lists, tuples, dicts); nothing is ever evaluated.

Anything else -- prose around a call, truncated JSON, unbalanced brackets,
positional arguments, names or expressions as values (``__import__('os')``) -- makes
:func:`parse_tool_calls` return ``None``: a partially garbled output decodes to
nothing rather than to the calls that happen to be readable.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from typing import Any

from hephaestus_jax.data.forge import ToolCall

_LEADING_TOKEN = "<|python_tag|>"
_TRAILING_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>")
_HERMES_CALLS = re.compile(r"\A(?:\s*<tool_call>(?:(?!</?tool_call>).)*</tool_call>)+\s*\Z", re.DOTALL)
_HERMES_CALL = re.compile(r"<tool_call>(?P<body>.*?)</tool_call>", re.DOTALL)
_CODE_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n(?P<body>.*)\n[ \t]*```\Z", re.DOTALL)
_ARGUMENT_KEYS = ("parameters", "arguments")
_JSON_SEPARATOR = re.compile(r"[\s;]*")


class _NotToolCalls(Exception):
    """Internal: the text is well-formed in some way but is not a list of tool calls."""


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """Decode ``text`` into tool calls; ``None`` when it is not (entirely) tool calls.

    Never raises on any string input; an empty list means the output explicitly
    decoded to zero calls (e.g. ``[]``).
    """
    body = _strip_wrappers(text)
    if not body:
        return None
    for decode in (_decode_json_calls, _decode_python_calls):
        try:
            return decode(body)
        except (_NotToolCalls, ValueError, SyntaxError, RecursionError, MemoryError):
            continue
    return None


def _strip_wrappers(text: str) -> str:
    """Remove Llama-3.1/ChatML special tokens, Hermes `<tool_call>` wrappers and one Markdown code fence."""
    body = text.strip()
    if body.startswith(_LEADING_TOKEN):
        body = body[len(_LEADING_TOKEN) :].strip()
    stripped = True
    while stripped:
        stripped = False
        for token in _TRAILING_TOKENS:
            if body.endswith(token):
                body = body[: -len(token)].rstrip()
                stripped = True
    fence = _CODE_FENCE.match(body)
    if fence:
        body = fence.group("body").strip()
    if _HERMES_CALLS.match(body):
        body = "\n".join(call.group("body").strip() for call in _HERMES_CALL.finditer(body))
    return body


# ----------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> None:
    raise _NotToolCalls(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotToolCalls(f"number out of range: {text}")
    return value


_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _decode_json_calls(body: str) -> list[ToolCall]:
    """A JSON list of call objects, or a sequence of call objects."""
    values = []
    position = _JSON_SEPARATOR.match(body, 0).end()
    while position < len(body):
        value, position = _JSON.raw_decode(body, position)
        values.append(value)
        position = _JSON_SEPARATOR.match(body, position).end()
    if len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    return [_call_from_json_object(value) for value in values]


def _call_from_json_object(value: Any) -> ToolCall:
    if not isinstance(value, dict):
        raise _NotToolCalls("a call must be a JSON object")
    argument_keys = [key for key in _ARGUMENT_KEYS if key in value]
    allowed = {"name", "type", *_ARGUMENT_KEYS}
    if len(argument_keys) != 1 or set(value) - allowed or value.get("type", "function") != "function":
        raise _NotToolCalls("a call object has exactly 'name' and 'parameters' (or 'arguments')")
    name = value.get("name")
    arguments = value[argument_keys[0]]
    if isinstance(arguments, str):
        arguments = _JSON.decode(arguments)
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        raise _NotToolCalls("a call needs a non-empty string name and an arguments object")
    return ToolCall(name=name.strip(), arguments=arguments)


# --------------------------------------------------------------------------- Python


def _decode_python_calls(body: str) -> list[ToolCall]:
    """Statements that are each a call or a list/tuple of calls, with literal arguments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. invalid escape sequences in string literals
        module = ast.parse(body, mode="exec")
    if not module.body:
        raise _NotToolCalls("no statements")
    calls: list[ToolCall] = []
    for statement in module.body:
        if not isinstance(statement, ast.Expr):
            raise _NotToolCalls("only call expressions are allowed")
        expression = statement.value
        if isinstance(expression, (ast.List, ast.Tuple)):
            calls.extend(_call_from_python(element) for element in expression.elts)
        else:
            calls.append(_call_from_python(expression))
    return calls


def _call_from_python(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call):
        raise _NotToolCalls("not a call")
    if node.args:
        raise _NotToolCalls("positional arguments cannot be matched to parameter names")
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in arguments:
            raise _NotToolCalls("**kwargs and repeated keywords are not allowed")
        arguments[keyword.arg] = _literal(keyword.value)
    return ToolCall(name=_dotted_name(node.func), arguments=arguments)


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise _NotToolCalls("a function name must be a (dotted) identifier")


def _literal(node: ast.expr) -> Any:
    """The value of a literal node; tuples become lists (as they would through JSON)."""
    if isinstance(node, ast.Constant) and _is_json_scalar(node.value):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and _is_number(operand.value):
            return -operand.value if isinstance(node.op, ast.USub) else operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _NotToolCalls("dict unpacking is not a literal")
        keys = [_literal(key) for key in node.keys]
        if not all(isinstance(key, str) for key in keys):
            raise _NotToolCalls("dict keys must be strings")
        return dict(zip(keys, (_literal(value) for value in node.values), strict=True))
    raise _NotToolCalls(f"not a literal: {type(node).__name__}")


def _is_number(value: Any) -> bool:
    """A finite int or float (bool excluded), i.e. a number JSON could carry."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)
