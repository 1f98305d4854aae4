"""Tests for hephaestus_jax.eval.bfcl and bfcl_files: file loaders, categories and scoring (the verdicts are
bfcl-eval's own: tests/eval/test_bfcl_checker.py)."""

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from hephaestus_jax.eval import bfcl, bfcl_files
from hephaestus_jax.eval.bfcl_files import BFCLFormatError, Question
from hephaestus_jax.eval.tool_calls import ToolCall

FIXTURES = Path(REPO_ROOT) / "tests" / "fixtures" / "bfcl"


def function(name, properties, required=(), schema_type="dict"):
    return {
        "name": name,
        "description": f"{name} (test function)",
        "parameters": {"type": schema_type, "properties": properties, "required": list(required)},
    }


AREA = function(
    "calc_area",
    {
        "base": {"type": "integer", "description": "base"},
        "height": {"type": "float", "description": "height"},
        "unit": {"type": "string", "description": "unit", "default": "cm"},
    },
    required=["base", "height"],
)
AREA_TRUTH = [{"calc_area": {"base": [10], "height": [5.0], "unit": ["cm", ""]}}]


def area(**arguments):
    return [ToolCall("calc_area", arguments)]


# ---------------------------------------------------------------------- categories


@pytest.mark.parametrize(
    "question_id, category",
    [
        ("simple_0", "simple"),
        ("simple_python_12", "simple"),
        ("simple_java_3", "simple_java"),
        ("simple_javascript_49", "simple_javascript"),
        ("multiple_3", "multiple"),
        ("parallel_7", "parallel"),
        ("parallel_multiple_12", "parallel_multiple"),
        ("irrelevance_239", "irrelevance"),
        ("live_simple_3-1-0", "live_simple"),
        ("live_multiple_1052-279-0", "live_multiple"),
        ("live_parallel_2-0-2", "live_parallel"),
        ("live_parallel_multiple_0-0-0", "live_parallel_multiple"),
        ("live_irrelevance_12-0-12", "live_irrelevance"),
        ("live_relevance_5-5-0", "live_relevance"),
        ("multi_turn_base_0", "multi_turn_base"),
        ("multi_turn_long_context_199", "multi_turn_long_context"),
    ],
)
def test_categorize_from_id_prefix(question_id, category):
    assert bfcl_files.categorize(question_id) == category


@pytest.mark.parametrize("question_id", ["simple", "simple_rust_3", "multi_turn_composite_0", "parallel-3", "12"])
def test_categorize_rejects_unknown_ids(question_id):
    with pytest.raises(ValueError):
        bfcl_files.categorize(question_id)


# ------------------------------------------------------------------------- loaders


def write_lines(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


QUESTION = {"id": "simple_0", "question": [[{"role": "user", "content": "area?"}]], "function": [AREA]}
OTHER = {**QUESTION, "id": "simple_1"}


def test_load_questions_reads_bfcl_format(tmp_path):
    path = write_lines(tmp_path, "q.json", [QUESTION, "", {**QUESTION, "id": "simple_1", "function": AREA}])
    questions = bfcl_files.load_questions(path)
    assert [q.id for q in questions] == ["simple_0", "simple_1"]
    assert questions[0] == Question("simple_0", "simple", QUESTION["question"], [AREA])
    assert questions[1].functions == [AREA]  # a single function object is wrapped in a list
    assert [q.category for q in bfcl_files.load_questions(path, category="live_simple")] == ["live_simple"] * 2


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({**OTHER, "id": 5}, "'id'"),
        ({**OTHER, "question": "area?"}, "'question'"),
        ({**OTHER, "question": [[{"role": "user"}]]}, "'content'"),
        ({**OTHER, "function": [{"description": "no name"}]}, "'name'"),
        ({**OTHER, "function": [AREA, AREA]}, "documented twice"),
        ({**OTHER, "function": [function("f", {"x": {"type": ["string"]}})]}, "'type' must be a type name"),
        ({**OTHER, "function": [function("f", {"x": {"type": "array", "items": {"type": 3}}})]}, "items"),
        ({**OTHER, "function": [{"name": "f", "parameters": {"type": "string"}}]}, "object schema"),
        ({**OTHER, "id": "multi_turn_composite_0"}, "category"),
        ({**OTHER, "id": "multi_turn_base_0"}, "multi_turn_base question needs 'involved_classes'"),
        (QUESTION, "duplicate id 'simple_0'"),
    ],
)
def test_load_questions_names_the_bad_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, "q.json", [QUESTION, bad_line])
    with pytest.raises(BFCLFormatError, match=message) as error:
        bfcl_files.load_questions(path)
    assert f"{path}:2:" in str(error.value)


def test_load_answers_reads_and_validates(tmp_path):
    good = {"id": "simple_0", "ground_truth": AREA_TRUTH}
    path = write_lines(tmp_path, "a.json", [good])
    assert bfcl_files.load_answers(path) == {"simple_0": AREA_TRUTH}
    for bad, message in [
        ({"id": "simple_1", "ground_truth": {"calc_area": {}}}, "must be a list"),
        ({"id": "simple_1", "ground_truth": [{"f": {}, "g": {}}]}, "one-key object"),
        ({"id": "simple_1", "ground_truth": [{"f": {"x": 1}}]}, "acceptable values must be a list"),
        ({"id": "simple_0", "ground_truth": AREA_TRUTH}, "duplicate id"),
    ]:
        path = write_lines(tmp_path, "a.json", [good, bad])
        with pytest.raises(BFCLFormatError, match=message) as error:
            bfcl_files.load_answers(path)
        assert f"{path}:2:" in str(error.value)


def test_load_predictions_accepts_text_and_bfcl_decoded_calls(tmp_path):
    path = write_lines(
        tmp_path,
        "p.jsonl",
        [
            {"id": "a", "result": "calc_area(base=1, height=2)", "latency": 0.3},
            {"id": "b", "result": [{"calc_area": {"base": 1}}, {"calc_volume": '{"side": 2.0}'}]},
            {"id": "c", "result": []},
        ],
    )
    predictions = bfcl_files.load_predictions(path)
    assert predictions == {
        "a": "calc_area(base=1, height=2)",
        "b": [ToolCall("calc_area", {"base": 1}), ToolCall("calc_volume", {"side": 2.0})],
        "c": [],
    }


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ({"id": "b"}, "'result'"),
        ({"id": "b", "result": 3}, "string or a list"),
        ({"id": "b", "result": [{"f": {}, "g": {}}]}, "one-key object"),
        ({"id": "b", "result": [{"f": "{oops"}]}, "not valid JSON"),
        ({"id": "b", "result": [{"f": [1]}]}, "must be an object"),
        ({"id": "a", "result": "x"}, "duplicate id"),
    ],
)
def test_load_predictions_names_the_bad_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, "p.jsonl", [{"id": "a", "result": "x"}, bad_line])
    with pytest.raises(BFCLFormatError, match=message) as error:
        bfcl_files.load_predictions(path)
    assert f"{path}:2:" in str(error.value)


# -------------------------------------------------------------------------- scoring


def load_fixture_run():
    questions = [q for path in sorted(FIXTURES.glob("BFCL_v3_*.json")) for q in bfcl_files.load_questions(path)]
    answers = {}
    for path in sorted((FIXTURES / "possible_answer").glob("BFCL_v3_*.json")):
        answers.update(bfcl_files.load_answers(path))
    return questions, answers, bfcl_files.load_predictions(FIXTURES / "predictions.jsonl")


# The verdict each fixture prediction was written to receive, and why.
EXPECTED_FIXTURE_VERDICTS = {
    "simple_0": True,  # optional 'unit' omitted, "" acceptable
    "simple_1": False,  # 'unit' omitted but required by the ground truth
    "simple_2": False,  # 5.0 for an integer parameter
    "multiple_0": True,  # "aapl" normalises to "AAPL"; optional exchange omitted
    "multiple_1": False,  # picked get_stock_price instead of convert_currency
    "parallel_0": True,  # both calls, swapped order, JSON lines
    "parallel_1": False,  # one of two calls
    "parallel_multiple_0": True,  # ints for floats, swapped order
    "parallel_multiple_1": False,  # median of the wrong list
    "irrelevance_0": True,  # prose, no call
    "irrelevance_1": False,  # called a function
    "live_simple_0-0-0": True,  # "Black" normalises to "black"
    "live_simple_1-1-0": True,  # already-decoded BFCL-form prediction
    "live_simple_2-1-1": False,  # no prediction at all
    "live_multiple_0-0-0": False,  # parameter 'label' is not in the schema
    "live_multiple_1-1-0": True,  # nested dict, normalised values, optional keys left out
    "live_parallel_0-0-0": False,  # Boston twice, San Francisco never
    "live_parallel_1-1-0": True,  # lists of dicts, arguments as a JSON string, swapped order
    "live_parallel_multiple_0-0-0": True,  # Python calls on two lines
    "live_parallel_multiple_1-1-0": False,  # truncated JSON
    "live_irrelevance_0-0-0": True,  # [] is zero calls
    "live_irrelevance_1-0-1": True,  # code injection does not decode, so no call
    "live_relevance_0-0-0": True,  # a call
    "live_relevance_1-1-0": False,  # prose only
}


def test_score_fixture_run_end_to_end():
    questions, answers, predictions = load_fixture_run()
    report = bfcl.score(questions, answers, predictions)

    assert {item.id: item.correct for item in report.items} == EXPECTED_FIXTURE_VERDICTS
    missing = [item for item in report.items if item.missing]
    assert [(m.id, m.reason) for m in missing] == [("live_simple_2-1-1", "missing prediction")]
    assert all(item.reason for item in report.items if not item.correct)
    assert report.unknown_prediction_ids == ("simple_99",)

    counts = {c.category: (c.correct, c.total, c.missing) for c in report.categories}
    assert counts == {
        "simple": (1, 3, 0),
        "multiple": (1, 2, 0),
        "parallel": (1, 2, 0),
        "parallel_multiple": (1, 2, 0),
        "irrelevance": (1, 2, 0),
        "live_simple": (2, 3, 1),
        "live_multiple": (1, 2, 0),
        "live_parallel": (1, 2, 0),
        "live_parallel_multiple": (1, 2, 0),
        "live_irrelevance": (2, 2, 0),
        "live_relevance": (1, 2, 0),
    }
    assert [c.category for c in report.categories] == [c for c in bfcl_files.CATEGORIES if c in counts]
    # 13 of 24 questions; per-category accuracies 1/3, 2/3, 1 and eight halves -> mean 6/11.
    assert report.micro_accuracy == pytest.approx(13 / 24)
    assert report.macro_accuracy == pytest.approx(6 / 11)


def test_report_json_and_table():
    report = bfcl.score(*load_fixture_run())
    data = json.loads(report.to_json())
    assert data["micro_accuracy"] == pytest.approx(13 / 24)
    assert data["macro_accuracy"] == pytest.approx(6 / 11)
    assert (data["correct"], data["total"], data["missing"]) == (13, 24, 1)
    assert data["categories"]["live_simple"] == {
        "accuracy": pytest.approx(2 / 3),
        "interval": list(bfcl.exact_interval(2, 3)),
        "correct": 2,
        "total": 3,
        "missing": 1,
    }
    (item,) = [item for item in data["items"] if item["id"] == "simple_2"]
    assert {"category": "simple", "correct": False, "missing": False}.items() <= item.items()
    assert "Expected type integer, got float" in item["reason"] and item["error_type"] == "type_error:simple"
    assert data["unknown_prediction_ids"] == ["simple_99"]

    table = bfcl.format_table(report)
    assert "live_simple" in table and "66.67%" in table
    assert "micro average" in table and "54.17%" in table
    assert "macro average" in table and "54.55%" in table
    assert "simple_99" in table


def test_score_accepts_decoded_calls_and_raw_text_alike():
    question = Question("simple_0", "simple", [], [AREA])
    answers = {"simple_0": AREA_TRUTH}
    as_text = bfcl.score([question], answers, {"simple_0": "calc_area(base=10, height=5)"})
    as_calls = bfcl.score([question], answers, {"simple_0": area(base=10, height=5)})
    assert [item.summary() for item in as_text.items] == [item.summary() for item in as_calls.items]
    assert as_text.items[0].correct
    (text_step,), = as_text.items[0].turns
    (calls_step,), = as_calls.items[0].turns
    assert text_step == {"text": "calc_area(base=10, height=5)", "calls": calls_step["calls"]}
    assert calls_step == {"text": None, "calls": [{"name": "calc_area", "arguments": {"base": 10, "height": 5}}]}


def test_score_rejects_inconsistent_inputs():
    question = Question("simple_0", "simple", [], [AREA])
    with pytest.raises(ValueError, match="no questions"):
        bfcl.score([], {}, {})
    with pytest.raises(ValueError, match="'simple_0'.*needs a ground truth"):
        bfcl.score([question], {}, {"simple_0": "calc_area(base=10, height=5)"})
    with pytest.raises(ValueError, match="appears twice"):
        bfcl.score([question, question], {"simple_0": AREA_TRUTH}, {})
