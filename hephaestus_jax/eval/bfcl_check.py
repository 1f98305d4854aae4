"""BFCL-style checking of one question's decoded calls: the AST checker's rules (files: bfcl_files.py; scoring a
run: bfcl.py).

The checks follow the Berkeley Function Calling Leaderboard's AST checker
(gorilla, ``berkeley-function-call-leaderboard``) for its Python categories:

* the called function must be the expected one; every required parameter is present;
  no parameter outside the schema or outside the ground truth; a ground-truth
  parameter may be left out only when ``""`` is among its acceptable values;
* the value's type must fit the schema (an int is accepted for a float, never the
  reverse; arrays/tuples are checked item by item, dicts key by key); a value of
  another type is still accepted when the ground truth lists exactly that value
  (BFCL's "variable" answers, e.g. a variable name for a number, or ``None``);
* the value must equal one acceptable value, strings compared after BFCL's
  normalisation (spaces and ``,./-_*^`` removed, lowercased, ``'`` -> ``"``), lists
  item by item, dicts key by key where each key holds its own acceptable-value list;
* ``simple``/``multiple`` expect exactly one call, the parallel categories several,
  in any order (each expected call paired with a distinct model call);
* ``(live_)irrelevance`` passes when no call decodes; ``live_relevance`` when one does.

Deliberate differences from BFCL: the parallel pairing searches all one-to-one
assignments (BFCL pairs greedily in ground-truth order, which can miss a valid
assignment); normalisation and per-key acceptable lists apply at every nesting
depth (BFCL: one level); ``any`` accepts any JSON value (BFCL: strings only);
function names are compared exactly (BFCL maps ``.`` to ``_`` for some API models);
an empty list is not taken for an omitted list parameter (BFCL's list check lets ``[]``
match the ``""`` marker). Java/JavaScript and multi-turn categories are not supported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.eval.bfcl_files import (TYPE_KINDS, GroundTruth, canonical_category, expected_calls,
                                            json_type_name)

_NO_CALL_CATEGORIES = frozenset({"irrelevance", "live_irrelevance"})
_SOME_CALL_CATEGORIES = frozenset({"live_relevance"})

OMITTED = ""  # in a ground truth's acceptable values: the parameter may be left out
_IGNORED_CHARACTERS = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True)
class CheckResult:
    """Whether one question was answered correctly, and why not (``reason`` is "" when correct)."""

    correct: bool
    reason: str = ""


def check_calls(
    category: str,
    functions: Sequence[Mapping[str, Any]],
    calls: Sequence[ToolCall] | None,
    ground_truth: GroundTruth | None = None,
) -> CheckResult:
    """Judge one question's decoded calls (``None``: the output did not decode) the BFCL way.

    ``ground_truth`` is required except for the (ir)relevance categories, which ignore it.
    Raises ``ValueError`` for inconsistent data (e.g. a ground truth naming a function
    that is not offered), never for a wrong answer.
    """
    category = canonical_category(category)
    if category in _NO_CALL_CATEGORIES:
        if not calls:
            return CheckResult(True)
        return CheckResult(False, f"made {len(calls)} call(s) ({_names(calls)}) where none was expected")
    if category in _SOME_CALL_CATEGORIES:
        if calls:
            return CheckResult(True)
        return CheckResult(False, "no tool call decoded" if calls is None else "decoded to an empty list of calls")
    if ground_truth is None:
        raise ValueError(f"category {category!r} needs a ground truth")
    return _check_against_truth(functions, calls, expected_calls(ground_truth))


def _check_against_truth(
    functions: Sequence[Mapping[str, Any]],
    calls: Sequence[ToolCall] | None,
    expected: list[tuple[str, dict[str, list[Any]]]],
) -> CheckResult:
    documents = {function["name"]: function for function in functions}
    for name, _ in expected:
        if name not in documents:
            raise ValueError(f"the ground truth calls {name!r}, which is not among the offered functions")
    if calls is None:
        return CheckResult(False, "output did not decode as tool calls")
    if len(calls) != len(expected):
        return CheckResult(False, f"expected {len(expected)} call(s), got {len(calls)}")
    errors = [[_call_error(call, name, documents[name], params) for call in calls] for name, params in expected]
    if _pairs_one_to_one([[error is None for error in row] for row in errors]):
        return CheckResult(True)
    return CheckResult(False, _explain_unpaired(expected, calls, errors))


def _call_error(call: ToolCall, name: str, document: Mapping[str, Any], expected: dict[str, list[Any]]) -> str | None:
    """Why ``call`` is not an acceptable call of ``name``; ``None`` when it is."""
    if call.name != name:
        return f"called {call.name!r} instead of {name!r}"
    schema = document["parameters"]
    properties = schema.get("properties", {})
    for parameter in schema.get("required", []):
        if parameter not in call.arguments:
            return f"{name}: missing required parameter {parameter!r}"
    for parameter, value in call.arguments.items():
        if parameter not in properties:
            return f"{name}: unknown parameter {parameter!r}"
        if parameter not in expected:
            return f"{name}: unexpected parameter {parameter!r} (the ground truth does not use it)"
        error = _argument_error(value, properties[parameter], expected[parameter])
        if error is not None:
            return f"{name}: parameter {parameter!r}: {error}"
    for parameter, acceptable in expected.items():
        if parameter not in call.arguments and OMITTED not in acceptable:
            return f"{name}: parameter {parameter!r} left out, but it must be one of {acceptable!r}"
    return None


def _argument_error(value: Any, schema: Mapping[str, Any], acceptable: list[Any]) -> str | None:
    type_error = _type_error(value, schema, "")
    if type_error is not None:
        listed = any(_identical(value, option) for option in acceptable if option != OMITTED)
        return None if listed else type_error
    if any(_matches(value, option) for option in acceptable):
        return None
    return f"value {value!r} is not among the acceptable values {acceptable!r}"


def _type_error(value: Any, schema: Mapping[str, Any], path: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (``path`` locates nested items); ``None`` when it does."""
    kind = TYPE_KINDS.get(schema.get("type"))
    if kind is None:
        raise ValueError(f"unsupported schema type {schema.get('type')!r}")
    if not _FITS_KIND[kind](value):
        return f"expected {schema['type']}{path and ' at ' + path}, got {json_type_name(value)}"
    if kind == "array" and "items" in schema:
        for index, item in enumerate(value):
            error = _type_error(item, schema["items"], f"{path}[{index}]")
            if error is not None:
                return error
    if kind == "object":
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                error = _type_error(item, properties[key], f"{path}.{key}")
                if error is not None:
                    return error
    return None


_FITS_KIND = {
    "any": lambda value: True,
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: _is_number(value),  # an int is accepted where a float is expected
    "boolean": lambda value: isinstance(value, bool),
    "array": lambda value: isinstance(value, (list, tuple)),
    "object": lambda value: isinstance(value, dict),
}


def _matches(value: Any, option: Any) -> bool:
    """Whether ``value`` equals one acceptable ``option`` the BFCL way (see the module doc)."""
    if isinstance(option, str):
        return isinstance(value, str) and normalize_string(value) == normalize_string(option)
    if isinstance(option, bool) or isinstance(value, bool):
        return isinstance(option, bool) and isinstance(value, bool) and option == value
    if _is_number(option):
        return _is_number(value) and value == option
    if option is None:
        return value is None
    if isinstance(option, list):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(option)
            and all(_matches(item, expected) for item, expected in zip(value, option, strict=True))
        )
    if isinstance(option, dict):
        return isinstance(value, dict) and (_matches_literal_dict(value, option) or _matches_keywise(value, option))
    return False


def _matches_literal_dict(value: dict[str, Any], option: dict[str, Any]) -> bool:
    return value.keys() == option.keys() and all(_matches(value[key], option[key]) for key in option)


def _matches_keywise(value: dict[str, Any], option: dict[str, Any]) -> bool:
    """``option`` maps each key to its acceptable values (``""``: the key may be left out)."""
    if not all(isinstance(values, list) for values in option.values()) or not value.keys() <= option.keys():
        return False
    for key, values in option.items():
        if key in value:
            if not any(_matches(value[key], expected) for expected in values):
                return False
        elif OMITTED not in values:
            return False
    return True


def normalize_string(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lowercase, ``'`` -> ``"``."""
    return _IGNORED_CHARACTERS.sub("", text).lower().replace("'", '"')


def _identical(value: Any, option: Any) -> bool:
    """Exact equality that tells 1, 1.0 and True apart (tuples equal lists, as through JSON)."""
    return _canonical_json(value) == _canonical_json(option)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _pairs_one_to_one(compatible: list[list[bool]]) -> bool:
    """Whether every row can be given a distinct column it is compatible with (augmenting paths)."""
    owner: dict[int, int] = {}

    def assign(row: int, visited: set[int]) -> bool:
        for column, ok in enumerate(compatible[row]):
            if ok and column not in visited:
                visited.add(column)
                if column not in owner or assign(owner[column], visited):
                    owner[column] = row
                    return True
        return False

    return all(assign(row, set()) for row in range(len(compatible)))


def _explain_unpaired(
    expected: list[tuple[str, dict[str, list[Any]]]], calls: Sequence[ToolCall], errors: list[list[str | None]]
) -> str:
    for index, (name, _) in enumerate(expected):
        if any(error is None for error in errors[index]):
            continue
        if len(calls) == 1:
            return errors[index][0]
        attempts = [f"call {j}: {errors[index][j]}" for j, call in enumerate(calls) if call.name == name]
        if attempts:
            return f"no call matches expected call {index} ({name}): " + "; ".join(attempts)
        return f"no call to {name!r} among {_names(calls)}"
    return "the calls cannot be paired one-to-one with the expected calls (a call is duplicated)"


def _names(calls: Sequence[ToolCall]) -> str:
    return ", ".join(call.name for call in calls)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
