"""BFCL's files: question, possible-answer and prediction files (JSON lines), read and validated, with
the categories named by question ids. Malformed lines raise BFCLFormatError naming `path:line`."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.json_lines import BadLine, read_json_lines

MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
CATEGORIES = (
    "simple",
    "simple_java",
    "simple_javascript",
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
    *MULTI_TURN_CATEGORIES,
)
_CATEGORY_ALIASES = {"simple_python": "simple"}  # BFCL v4 spelling of the non-live simple (Python) set
_ID_PATTERN = re.compile(r"(?P<prefix>[A-Za-z_]+?)_\d+(?:-\d+)*")

GroundTruth = list[dict[str, dict[str, list[Any]]]] | list[list[str]]
"""BFCL's ground truth of one question: ``[{function_name: {param: [acceptable values]}}, ...]``; of a multi-turn
question, each turn's calls as BFCL executes them: ``[["cd(folder='x')", ...], ...]``."""



@dataclass(frozen=True)
class Verdict:
    """BFCL's verdict on one question; `reason` and `error_type` (BFCL's own error type) are "" when correct."""

    correct: bool
    reason: str = ""
    error_type: str = ""


Step = dict[str, Any]
"""One model step as the per-question record keeps it: {"text", "calls": [{"name", "arguments"}] or None when the
text did not decode, "results": [execution result strings] (multi-turn)}."""

INFERENCE_ERROR = "Error during inference: "
"""How BFCL's generation records a conversation that raised (e.g. a prompt longer than the context): its result
is this string plus the error, not a list of turns."""


@dataclass
class Conversation:
    """A question's run: the steps of each user turn reached, and the inference error that ended it ("" if none)."""

    turns: list[list[Step]] = field(default_factory=list)
    error: str = ""

    def bfcl_result(self) -> list[list[str]] | str:
        """BFCL's result-file form: each turn's step texts, or for an inference error the error string."""
        if self.error:
            return INFERENCE_ERROR + self.error
        return [[step["text"] for step in turn] for turn in self.turns]


Prediction = str | Sequence[ToolCall] | Sequence[Sequence[str]] | Conversation
"""A single-turn question's raw output text or decoded calls; a multi-turn question's texts per turn and step (or
BFCL's inference-error string); either's `Conversation` (a model's run, or a record read back)."""


class BFCLFormatError(BadLine):
    """A BFCL question, answer or prediction file has a malformed line; str() is "path:line: problem"."""


@dataclass(frozen=True)
class MultiTurnSetup:
    """What a multi-turn question runs against: BFCL's back-end classes, their initial state, and (miss_func) the
    function documents withheld from `Question.functions` until a turn, by turn index."""

    involved_classes: tuple[str, ...]
    initial_config: dict[str, Any]
    added_functions: dict[int, list[dict[str, Any]]]


@dataclass(frozen=True)
class Question:
    """One BFCL question: the conversation turns and the functions offered (at first, for a multi-turn one)."""

    id: str
    category: str
    turns: list[list[dict[str, Any]]]
    functions: list[dict[str, Any]]
    multi_turn: MultiTurnSetup | None = None


# ------------------------------------------------------------------------ categories


def categorize(question_id: str) -> str:
    """The category named by a BFCL id's prefix: ``parallel_multiple_12``, ``live_simple_3-1-0``."""
    match = _ID_PATTERN.fullmatch(question_id)
    if match is None:
        raise ValueError(f"cannot tell the category of question id {question_id!r}; pass the category explicitly")
    return canonical_category(match.group("prefix"))


def is_multi_turn(category: str) -> bool:
    """Whether a category's questions are multi-turn conversations (executed, and checked by state)."""
    return category in MULTI_TURN_CATEGORIES


def canonical_category(name: str) -> str:
    """Validate a category name (accepting BFCL v4's ``simple_python`` for ``simple``)."""
    category = _CATEGORY_ALIASES.get(name, name)
    if category not in CATEGORIES:
        raise ValueError(f"unsupported BFCL category {name!r}; supported: {', '.join(CATEGORIES)}")
    return category


def bfcl_category(category: str) -> str:
    """BFCL's name of one of our categories (``simple`` is BFCL v4's ``simple_python``)."""
    return {ours: theirs for theirs, ours in _CATEGORY_ALIASES.items()}.get(category, category)


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
            question_category = forced or categorize(question_id)
            setup = None
            if question_category in MULTI_TURN_CATEGORIES:
                if "involved_classes" not in record:
                    raise ValueError(f"a {question_category} question needs 'involved_classes'")
                record, setup = _multi_turn_setup(record)
            functions = record.get("function")
            if isinstance(functions, dict):  # early BFCL files give a single function as an object
                functions = [functions]
            _validate_functions(functions)
        except ValueError as error:
            raise BFCLFormatError(where, str(error)) from None
        questions.append(Question(question_id, question_category, turns, functions, setup))
    return questions


def _multi_turn_setup(record: dict[str, Any]) -> tuple[dict[str, Any], MultiTurnSetup]:
    """A multi-turn record (no "function" field) with its functions filled in from bfcl-eval's documents of its
    `involved_classes`, withheld `missed_function`s moved out and the language hint added, as BFCL's
    `load_dataset_entry` does (so the withheld ones, added later, go without the hint, as in BFCL)."""
    # lazy: bfcl-eval is the optional `bfcl` extra, needed only by multi-turn questions.
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING
    from bfcl_eval.utils import add_language_specific_hint_to_function_doc as add_hint
    from bfcl_eval.utils import populate_test_cases_with_predefined_functions as populate

    classes, config = record["involved_classes"], record.get("initial_config", {})
    if not isinstance(classes, list) or not all(name in MULTI_TURN_FUNC_DOC_FILE_MAPPING for name in classes):
        raise ValueError(f"'involved_classes' must list BFCL back-end classes "
                         f"({', '.join(MULTI_TURN_FUNC_DOC_FILE_MAPPING)}), got {classes!r}")
    if not isinstance(config, dict):
        raise ValueError(f"'initial_config' must be an object, got {json_type_name(config)}")
    missed = record.get("missed_function", {})
    if not isinstance(missed, dict) or not all(key.isdigit() and isinstance(names, list)
                                               for key, names in missed.items()):
        raise ValueError(f"'missed_function' must map turn indices to lists of function names, got {missed!r}")
    (record,) = add_hint(populate([json.loads(json.dumps(record))]))
    added = {int(turn): functions for turn, functions in record.get("missed_function", {}).items()}
    return record, MultiTurnSetup(tuple(classes), config, added)


def load_answers(path: str | Path) -> dict[str, GroundTruth]:
    """Read a BFCL possible-answer file (JSON lines) into ``{id: ground_truth}``."""
    answers: dict[str, GroundTruth] = {}
    for where, record in _read_jsonl(path):
        try:
            question_id = _new_id(record, answers.keys())
            ground_truth = record.get("ground_truth")
            if not _string_turns(ground_truth, "a multi-turn 'ground_truth'", "call strings"):
                expected_calls(ground_truth)
        except ValueError as error:
            raise BFCLFormatError(where, str(error)) from None
        answers[question_id] = ground_truth
    return answers


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """Read predictions (JSON lines) into ``{id: prediction}``, each line one of:

    * BFCL's result form ``{"id", "result"}``: ``result`` is a single-turn question's raw output text, or its
      decoded calls ``[{"func": {"a": 1}}, ...]`` (arguments possibly a JSON-encoded string), or a multi-turn
      question's raw texts per turn and step ``[["...", ...], ...]``;
    * a per-question record as `bfcl.ItemResult.record` writes it: ``{"id", "turns": [[{"text", "calls",
      ...}, ...], ...], ...}`` (the verdict in it is ignored: the record is scored anew).
    """
    predictions: dict[str, Prediction] = {}
    for where, record in _read_jsonl(path):
        try:
            question_id = _new_id(record, predictions.keys())
            if "turns" in record:
                error = record.get("error", "")
                if not isinstance(error, str):
                    raise ValueError("a record's 'error' must be a string")
                predictions[question_id] = Conversation(_record_turns(record["turns"]), error)
            elif "result" in record:
                predictions[question_id] = _result(record["result"])
            else:
                raise ValueError("missing field 'result' (BFCL's result form) or 'turns' (a record)")
        except ValueError as error:
            raise BFCLFormatError(where, str(error)) from None
    return predictions


def _result(result: Any) -> Prediction:
    if isinstance(result, str):
        return result
    if _string_turns(result, "a multi-turn 'result'", "output strings"):
        return result
    return _calls_from_bfcl(result)


def _string_turns(value: Any, what: str, items: str) -> bool:
    """Whether `value` has the multi-turn form, a non-empty list of turns (lists); ValueError "<what> must be a list
    of turns, each a list of <items>" when a turn holds anything but strings."""
    if not (isinstance(value, list) and value and all(isinstance(turn, list) for turn in value)):
        return False
    if not all(isinstance(item, str) for turn in value for item in turn):
        raise ValueError(f"{what} must be a list of turns, each a list of {items}")
    return True


def _record_turns(turns: Any) -> list[list[dict[str, Any]]]:
    """A record's turns, each step checked: a string or null "text", and "calls" a list of {"name", "arguments"}
    objects or null (only read when "text" is null)."""
    if not isinstance(turns, list) or not all(isinstance(turn, list) for turn in turns):
        raise ValueError("'turns' must be a list of turns, each a list of steps")
    for turn in turns:
        for step in turn:
            if not isinstance(step, dict) or not isinstance(step.get("text"), (str, type(None))):
                raise ValueError(f"each step must be an object with a string or null 'text': {step!r}")
            calls = step.get("calls")
            if step.get("text") is None and not _is_call_list(calls):
                raise ValueError(f"a step without text needs 'calls': a list of {{name, arguments}}: {step!r}")
    return turns


def _is_call_list(calls: Any) -> bool:
    return isinstance(calls, list) and all(
        isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
        for call in calls)


def _read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("path:line", object)`` for each non-blank line."""
    for line in read_json_lines(path, error=BFCLFormatError):
        yield line.where, line.value


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
        if not isinstance(parameters, dict) or parameters.get("type") not in ("dict", "object"):
            raise ValueError(f"function {name!r}: 'parameters' must be an object schema")
        _validate_schema(parameters, f"function {name!r} parameters")


def _validate_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a schema must be an object, got {json_type_name(schema)}")
    if not isinstance(schema.get("type", ""), str):  # BFCL's type names (Python's, Java's, JavaScript's)
        raise ValueError(f"{where}: 'type' must be a type name, got {schema['type']!r}")
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


def expected_calls(ground_truth: Any) -> list[tuple[str, dict[str, list[Any]]]]:
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
        raise ValueError(f"'result' must be a string or a list of calls, got {json_type_name(result)}")
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
            raise ValueError(f"arguments of {name!r} must be an object, got {json_type_name(arguments)}")
        calls.append(ToolCall(name=name, arguments=arguments))
    return calls


_TYPE_NAMES = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    tuple: "tuple",
    dict: "dict",
}


def json_type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)
