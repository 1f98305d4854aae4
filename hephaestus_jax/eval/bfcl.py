"""BFCL-style function-calling evaluation: read BFCL files, check calls, score a run.

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
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.errors import InputError
from hephaestus_jax.eval.tool_calls import parse_tool_calls
from hephaestus_jax.json_lines import read_json_lines

CATEGORIES = (
    "simple",
    "multiple",
    "parallel",
    "parallel_multiple",
    "irrelevance",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
    "live_irrelevance",
    "live_relevance",
)
_CATEGORY_ALIASES = {"simple_python": "simple"}  # BFCL v4 spelling of the non-live simple set
_NO_CALL_CATEGORIES = frozenset({"irrelevance", "live_irrelevance"})
_SOME_CALL_CATEGORIES = frozenset({"live_relevance"})
_ID_PATTERN = re.compile(r"(?P<prefix>[A-Za-z_]+?)_\d+(?:-\d+)*")

OMITTED = ""  # in a ground truth's acceptable values: the parameter may be left out
_IGNORED_CHARACTERS = re.compile(r"[ ,./\-_*^]")

# Schema type name (BFCL's python-ish names and JSON-schema names) -> kind of value.
_TYPE_KINDS = {
    "string": "string",
    "integer": "integer",
    "float": "number",
    "number": "number",
    "boolean": "boolean",
    "array": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
    "any": "any",
}

GroundTruth = list[dict[str, dict[str, list[Any]]]]
"""BFCL's ground truth of one question: ``[{function_name: {param: [acceptable values]}}, ...]``."""

Prediction = str | Sequence[ToolCall]
"""A model's raw output text, or calls already decoded."""


class BFCLFormatError(InputError, ValueError):
    """A BFCL question, answer or prediction file has a malformed line."""


@dataclass(frozen=True)
class Question:
    """One BFCL question: the conversation turns and the functions offered."""

    id: str
    category: str
    turns: list[list[dict[str, Any]]]
    functions: list[dict[str, Any]]


@dataclass(frozen=True)
class CheckResult:
    """Whether one question was answered correctly, and why not (``reason`` is "" when correct)."""

    correct: bool
    reason: str = ""


@dataclass(frozen=True)
class ItemResult:
    """The verdict on one question of a scored run."""

    id: str
    category: str
    correct: bool
    reason: str
    missing: bool


@dataclass(frozen=True)
class CategoryScore:
    """Counts for one category of a scored run."""

    category: str
    total: int
    correct: int
    missing: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class Report:
    """A scored run: per-category counts, per-question verdicts, and both overall averages."""

    categories: tuple[CategoryScore, ...]
    items: tuple[ItemResult, ...]
    unknown_prediction_ids: tuple[str, ...] = ()

    @property
    def macro_accuracy(self) -> float:
        """Unweighted mean of the per-category accuracies (how BFCL summarises categories)."""
        return sum(category.accuracy for category in self.categories) / len(self.categories)

    @property
    def micro_accuracy(self) -> float:
        """Correct questions over all questions, whatever their category."""
        return self.correct / self.total

    @property
    def total(self) -> int:
        return sum(c.total for c in self.categories)

    @property
    def correct(self) -> int:
        return sum(c.correct for c in self.categories)

    @property
    def missing(self) -> int:
        return sum(c.missing for c in self.categories)

    def to_dict(self) -> dict[str, Any]:
        return {
            "macro_accuracy": self.macro_accuracy,
            "micro_accuracy": self.micro_accuracy,
            "correct": self.correct,
            "total": self.total,
            "missing": self.missing,
            "categories": {
                c.category: {"accuracy": c.accuracy, "correct": c.correct, "total": c.total, "missing": c.missing}
                for c in self.categories
            },
            "items": [asdict(item) for item in self.items],
            "unknown_prediction_ids": list(self.unknown_prediction_ids),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def bootstrap_interval(outcomes: Sequence[bool], level: float = 0.95, samples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy: the (1-level)/2 and (1+level)/2 quantiles of the mean of
    `samples` resamples (with replacement) of the per-question outcomes."""
    if not outcomes:
        raise ValueError("no outcomes to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(outcomes, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, values.size, size=(samples, values.size))
    means = values[draws].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


# ------------------------------------------------------------------------ categories


def categorize(question_id: str) -> str:
    """The category named by a BFCL id's prefix: ``parallel_multiple_12``, ``live_simple_3-1-0``."""
    match = _ID_PATTERN.fullmatch(question_id)
    if match is None:
        raise ValueError(f"cannot tell the category of question id {question_id!r}; pass the category explicitly")
    return canonical_category(match.group("prefix"))


def canonical_category(name: str) -> str:
    """Validate a category name (accepting BFCL v4's ``simple_python`` for ``simple``)."""
    category = _CATEGORY_ALIASES.get(name, name)
    if category not in CATEGORIES:
        raise ValueError(f"unsupported BFCL category {name!r}; supported: {', '.join(CATEGORIES)}")
    return category


# ----------------------------------------------------------------------------- files


def load_questions(path: str | Path, category: str | None = None) -> list[Question]:
    """Read a BFCL question file (JSON lines); the category comes from each id unless given."""
    forced = canonical_category(category) if category is not None else None
    questions: list[Question] = []
    seen: set[str] = set()
    for where, record in _read_jsonl(path):
        try:
            question_id = _new_id(record, seen)
            seen.add(question_id)
            turns = _validate_turns(record.get("question"))
            functions = record.get("function")
            if isinstance(functions, dict):  # early BFCL files give a single function as an object
                functions = [functions]
            _validate_functions(functions)
            question_category = forced or categorize(question_id)
        except ValueError as error:
            raise BFCLFormatError(f"{where}: {error}") from error
        questions.append(Question(question_id, question_category, turns, functions))
    return questions


def load_answers(path: str | Path) -> dict[str, GroundTruth]:
    """Read a BFCL possible-answer file (JSON lines) into ``{id: ground_truth}``."""
    answers: dict[str, GroundTruth] = {}
    for where, record in _read_jsonl(path):
        try:
            question_id = _new_id(record, answers.keys())
            ground_truth = record.get("ground_truth")
            _expected_calls(ground_truth)
        except ValueError as error:
            raise BFCLFormatError(f"{where}: {error}") from error
        answers[question_id] = ground_truth
    return answers


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """Read predictions (JSON lines ``{"id", "result"}``) into ``{id: raw text or decoded calls}``.

    ``result`` is the model's raw output text, or BFCL's decoded form
    ``[{"func": {"a": 1}}, ...]`` whose arguments may also be a JSON-encoded string.
    """
    predictions: dict[str, Prediction] = {}
    for where, record in _read_jsonl(path):
        try:
            question_id = _new_id(record, predictions.keys())
            if "result" not in record:
                raise ValueError("missing field 'result'")
            result = record["result"]
            predictions[question_id] = result if isinstance(result, str) else _calls_from_bfcl(result)
        except ValueError as error:
            raise BFCLFormatError(f"{where}: {error}") from error
    return predictions


def _read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("path:line", object)`` for each non-blank line."""
    try:
        for where, record in read_json_lines(path):
            if not isinstance(record, dict):
                raise BFCLFormatError(f"{where}: expected a JSON object, got {_type_name(record)}")
            yield where, record
    except BFCLFormatError:
        raise
    except ValueError as error:
        raise BFCLFormatError(str(error)) from None


def _new_id(record: dict[str, Any], seen: Collection[str]) -> str:
    """The record's ``id``, which must be a non-empty string not in ``seen``."""
    question_id = record.get("id")
    if not isinstance(question_id, str) or not question_id:
        raise ValueError("missing or non-string field 'id'")
    if question_id in seen:
        raise ValueError(f"duplicate id {question_id!r}")
    return question_id


def _validate_turns(turns: Any) -> list[list[dict[str, Any]]]:
    if not isinstance(turns, list) or not all(isinstance(turn, list) for turn in turns):
        raise ValueError("field 'question' must be a list of turns, each a list of messages")
    for turn in turns:
        for message in turn:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"each message needs a string 'role': {message!r}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"each message needs a string 'content': {message!r}")
    return turns


def _validate_functions(functions: Any) -> None:
    if not isinstance(functions, list):
        raise ValueError("field 'function' must be a list of function documents")
    names = set()
    for function in functions:
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"each function needs a non-empty string 'name': {function!r}")
        name = function["name"]
        if name in names:
            raise ValueError(f"function {name!r} is documented twice")
        names.add(name)
        parameters = function.get("parameters")
        if not isinstance(parameters, dict) or _TYPE_KINDS.get(parameters.get("type")) != "object":
            raise ValueError(f"function {name!r}: 'parameters' must be an object schema")
        _validate_schema(parameters, f"function {name!r} parameters")


def _validate_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a schema must be an object, got {_type_name(schema)}")
    type_name = schema.get("type")
    if not isinstance(type_name, str) or type_name not in _TYPE_KINDS:
        raise ValueError(f"{where}: unsupported type {type_name!r}; supported: {', '.join(_TYPE_KINDS)}")
    if "items" in schema:
        _validate_schema(schema["items"], f"{where} items")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise ValueError(f"{where}: 'properties' must be an object")
    for key, child in properties.items():
        _validate_schema(child, f"{where}.{key}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise ValueError(f"{where}: 'required' must be a list of parameter names")


def _expected_calls(ground_truth: Any) -> list[tuple[str, dict[str, list[Any]]]]:
    """Validate BFCL's ground-truth form and return ``[(name, {param: acceptable values})]``."""
    if not isinstance(ground_truth, list):
        raise ValueError("'ground_truth' must be a list of {function: {param: [acceptable values]}}")
    calls = []
    for entry in ground_truth:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"each ground-truth call must be a one-key object, got {entry!r}")
        ((name, parameters),) = entry.items()
        if not isinstance(parameters, dict):
            raise ValueError(f"ground truth for {name!r}: parameters must be an object")
        for parameter, acceptable in parameters.items():
            if not isinstance(acceptable, list):
                raise ValueError(f"ground truth for {name!r}.{parameter}: acceptable values must be a list")
        calls.append((name, parameters))
    return calls


def _calls_from_bfcl(result: Any) -> list[ToolCall]:
    """BFCL's decoded calls ``[{name: {arg: value}}]`` (arguments possibly a JSON string)."""
    if not isinstance(result, list):
        raise ValueError(f"'result' must be a string or a list of calls, got {_type_name(result)}")
    calls = []
    for entry in result:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"each decoded call must be a one-key object {{name: arguments}}, got {entry!r}")
        ((name, arguments),) = entry.items()
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise ValueError(f"arguments of {name!r} are not valid JSON: {error}") from error
        if not isinstance(arguments, dict):
            raise ValueError(f"arguments of {name!r} must be an object, got {_type_name(arguments)}")
        calls.append(ToolCall(name=name, arguments=arguments))
    return calls


# --------------------------------------------------------------------------- checking


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
    return _check_against_truth(functions, calls, _expected_calls(ground_truth))


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
    kind = _TYPE_KINDS.get(schema.get("type"))
    if kind is None:
        raise ValueError(f"unsupported schema type {schema.get('type')!r}")
    if not _FITS_KIND[kind](value):
        return f"expected {schema['type']}{path and ' at ' + path}, got {_type_name(value)}"
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


_TYPE_NAMES = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    tuple: "tuple",
    dict: "dict",
}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------- scoring


def score(
    questions: Sequence[Question],
    answers: Mapping[str, GroundTruth],
    predictions: Mapping[str, Prediction],
) -> Report:
    """Score predictions (``{id: raw output or decoded calls}``) against questions and answers.

    A question without a prediction counts as wrong and is flagged ``missing``; predictions
    for ids that are not among the questions are listed in ``Report.unknown_prediction_ids``.
    """
    if not questions:
        raise ValueError("no questions to score")
    items, seen = [], set()
    for question in questions:
        if question.id in seen:
            raise ValueError(f"question {question.id!r} appears twice")
        seen.add(question.id)
        ground_truth = answers.get(question.id)
        missing = question.id not in predictions
        calls = None if missing else _decoded(predictions[question.id])
        try:
            result = check_calls(question.category, question.functions, calls, ground_truth)
        except ValueError as error:
            raise ValueError(f"question {question.id!r}: {error}") from error
        if missing:
            result = CheckResult(False, "missing prediction")
        items.append(ItemResult(question.id, question.category, result.correct, result.reason, missing))
    unknown = tuple(sorted(set(predictions) - seen))
    return Report(categories=_category_scores(items), items=tuple(items), unknown_prediction_ids=unknown)


def _decoded(prediction: Prediction) -> list[ToolCall] | None:
    if isinstance(prediction, str):
        return parse_tool_calls(prediction)
    if all(isinstance(call, ToolCall) for call in prediction):
        return list(prediction)
    raise TypeError(f"a prediction must be a string or a sequence of ToolCall, got {prediction!r}")


def _category_scores(items: list[ItemResult]) -> tuple[CategoryScore, ...]:
    scores = []
    for category in CATEGORIES:
        members = [item for item in items if item.category == category]
        if members:
            scores.append(
                CategoryScore(
                    category=category,
                    total=len(members),
                    correct=sum(item.correct for item in members),
                    missing=sum(item.missing for item in members),
                )
            )
    return tuple(scores)


def format_table(report: Report) -> str:
    """A plain-text table: one row per category, then the micro and macro averages."""
    width = max(len("micro average"), *(len(c.category) for c in report.categories))

    def row(label: str, accuracy: str, correct: Any, total: Any, missing: Any) -> str:
        return f"{label:<{width}}  {accuracy:>8}  {correct:>7}  {total:>5}  {missing:>7}"

    header = row("category", "accuracy", "correct", "total", "missing")
    rows = [header, "-" * len(header)]
    for c in report.categories:
        rows.append(row(c.category, _percent(c.accuracy), c.correct, c.total, c.missing))
    rows.append("-" * len(header))
    rows.append(row("micro average", _percent(report.micro_accuracy), report.correct, report.total, report.missing))
    macro = _percent(report.macro_accuracy)
    rows.append(f"{row('macro average', macro, '', '', '').rstrip()}  (mean of {len(report.categories)} categories)")
    if report.unknown_prediction_ids:
        shown = ", ".join(report.unknown_prediction_ids[:5])
        rows.append(f"note: {len(report.unknown_prediction_ids)} prediction(s) for unknown ids, e.g. {shown}")
    return "\n".join(rows)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"
