"""Tests for hephaestus_jax.eval.bfcl: the BFCL checker, file loaders and scoring."""

import json
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from hephaestus_jax.eval import bfcl, bfcl_files
from hephaestus_jax.eval.bfcl_check import CheckResult, check_calls
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


def simple(calls, truth=AREA_TRUTH, functions=(AREA,), category="simple"):
    return check_calls(category, list(functions), calls, truth)


# ---------------------------------------------------------------------------- simple


def test_exact_call_is_correct():
    assert simple(area(base=10, height=5.0, unit="cm")) == CheckResult(True, "")


def test_wrong_function_name_is_rejected():
    result = simple([ToolCall("calc_volume", {"base": 10, "height": 5.0})])
    assert not result.correct and "calc_volume" in result.reason


def test_missing_required_parameter_is_rejected():
    result = simple(area(base=10))
    assert not result.correct and "missing required parameter 'height'" in result.reason


def test_parameter_outside_the_schema_is_rejected():
    result = simple(area(base=10, height=5.0, color="red"))
    assert not result.correct and "unknown parameter 'color'" in result.reason


def test_schema_parameter_that_the_ground_truth_leaves_out_is_rejected():
    truth = [{"calc_area": {"base": [10], "height": [5.0]}}]
    assert simple(area(base=10, height=5.0), truth=truth).correct
    result = simple(area(base=10, height=5.0, unit="cm"), truth=truth)
    assert not result.correct and "unexpected parameter 'unit'" in result.reason


@pytest.mark.parametrize("bad_base", ["10", 10.0, True, [10], None, {"v": 10}])
def test_wrong_type_is_rejected(bad_base):
    result = simple(area(base=bad_base, height=5.0))
    assert not result.correct and "expected integer" in result.reason


def test_value_not_among_acceptable_values_is_rejected():
    result = simple(area(base=11, height=5.0))
    assert not result.correct and "not among the acceptable values" in result.reason


def test_int_accepted_for_float_but_float_rejected_for_int():
    assert simple(area(base=10, height=5)).correct
    result = simple(area(base=10.0, height=5.0))
    assert not result.correct and "expected integer" in result.reason


def test_bool_is_not_a_number():
    assert not simple(area(base=10, height=True)).correct


def test_optional_parameter_may_be_omitted_when_empty_string_is_acceptable():
    assert simple(area(base=10, height=5.0)).correct


def test_ground_truth_parameter_omitted_when_not_allowed_is_rejected():
    truth = [{"calc_area": {"base": [10], "height": [5.0], "unit": ["cm"]}}]
    result = simple(area(base=10, height=5.0), truth=truth)
    assert not result.correct and "'unit' left out" in result.reason


def test_empty_string_marker_does_not_accept_a_provided_wrong_value():
    truth = [{"calc_area": {"base": [10], "height": [5.0], "unit": [""]}}]
    assert not simple(area(base=10, height=5.0, unit="mm"), truth=truth).correct


@pytest.mark.parametrize(
    "given, accepted",
    [
        ("San Francisco, CA", True),
        ("san francisco,ca", True),
        ("SAN-FRANCISCO_CA.", True),
        ("San  Francisco / CA*^", True),
        ("San Francisco CA!", False),  # '!' is not among BFCL's ignored characters
        ("Los Angeles, CA", False),
    ],
)
def test_string_normalisation_follows_bfcl(given, accepted):
    city = function("find", {"city": {"type": "string", "description": "c"}}, required=["city"])
    truth = [{"find": {"city": ["San Francisco, CA"]}}]
    assert check_calls("simple", [city], [ToolCall("find", {"city": given})], truth).correct is accepted


def test_single_and_double_quotes_normalise_alike():
    text = function("say", {"text": {"type": "string", "description": "t"}}, required=["text"])
    truth = [{"say": {"text": ['say "hi"']}}]
    assert check_calls("simple", [text], [ToolCall("say", {"text": "say 'hi'"})], truth).correct


def test_undecodable_output_is_wrong():
    result = simple(None)
    assert not result.correct and "did not decode" in result.reason


def test_simple_needs_exactly_one_call():
    result = simple(area(base=10, height=5.0) * 2)
    assert not result.correct and "expected 1 call(s), got 2" in result.reason
    assert not simple([]).correct


# ------------------------------------------------------------------- typed values


LISTS = function(
    "stats",
    {
        "data": {"type": "array", "items": {"type": "integer"}, "description": "d"},
        "labels": {"type": "array", "items": {"type": "string"}, "description": "l"},
        "point": {"type": "tuple", "items": {"type": "float"}, "description": "p"},
    },
    required=["data"],
)
LISTS_TRUTH = [{"stats": {"data": [[3, 4, 5]], "labels": [["New York", "Los Angeles"], ""], "point": [[1.5, 2.0], ""]}}]


@pytest.mark.parametrize(
    "arguments, accepted",
    [
        ({"data": [3, 4, 5]}, True),
        ({"data": (3, 4, 5)}, True),
        ({"data": [3, 4, 5], "labels": ["new york", "los-angeles"]}, True),
        ({"data": [3, 4, 5], "point": (1.5, 2)}, True),  # tuple value, int item for float
        ({"data": [5, 4, 3]}, False),  # lists compare in order
        ({"data": [3, 4]}, False),
        ({"data": [3, 4, 5, 6]}, False),
        ({"data": [3, "4", 5]}, False),  # items are type-checked
        ({"data": [3, 4.0, 5]}, False),
        ({"data": [3, 4, 5], "labels": ["New York"]}, False),
        ({"data": [3, 4, 5], "labels": "New York, Los Angeles"}, False),
    ],
)
def test_lists_compare_element_wise(arguments, accepted):
    assert check_calls("simple", [LISTS], [ToolCall("stats", arguments)], LISTS_TRUTH).correct is accepted


ORDER = function(
    "order",
    {
        "drink": {"type": "string", "description": "d"},
        "preferences": {
            "type": "dict",
            "description": "p",
            "properties": {
                "size": {"type": "string", "description": "s"},
                "shots": {"type": "integer", "description": "n"},
                "extras": {"type": "array", "items": {"type": "string"}, "description": "e"},
            },
        },
    },
    required=["drink", "preferences"],
)
ORDER_TRUTH = [
    {
        "order": {
            "drink": ["latte"],
            "preferences": [{"size": ["large", "L"], "shots": [2, ""], "extras": [["oat milk"], ""]}],
        }
    }
]


@pytest.mark.parametrize(
    "preferences, accepted",
    [
        ({"size": "large", "shots": 2, "extras": ["oat milk"]}, True),
        ({"size": "L"}, True),  # keys whose acceptable values include "" may be left out
        ({"size": "Large", "extras": ["Oat-Milk"]}, True),  # normalisation inside dicts and their lists
        ({"size": "medium"}, False),
        ({"shots": 2}, False),  # 'size' has no "" among its acceptable values
        ({"size": "large", "sugar": 1}, False),  # key outside the ground truth
        ({"size": "large", "shots": "2"}, False),  # nested type mismatch
        ({"size": "large", "extras": ["soy milk"]}, False),
        ("large", False),
    ],
)
def test_dicts_compare_key_by_key(preferences, accepted):
    call = ToolCall("order", {"drink": "latte", "preferences": preferences})
    assert check_calls("simple", [ORDER], [call], ORDER_TRUTH).correct is accepted


def test_list_of_dicts_compares_each_dict_in_order():
    cart = function(
        "add",
        {
            "items": {
                "type": "array",
                "description": "i",
                "items": {"type": "dict", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}}},
            }
        },
        required=["items"],
    )
    truth = [{"add": {"items": [[{"name": ["apple"], "qty": [2]}, {"name": ["pear"], "qty": [1, ""]}]]}}]

    def check(items):
        return check_calls("simple", [cart], [ToolCall("add", {"items": items})], truth).correct

    assert check([{"name": "Apple", "qty": 2}, {"name": "pear"}])
    assert not check([{"name": "pear"}, {"name": "Apple", "qty": 2}])
    assert not check([{"name": "apple", "qty": 2}])
    assert not check([{"name": "apple", "qty": 2.0}, {"name": "pear"}])


def test_literal_dict_inside_an_acceptable_dict():
    position = function("move", {"target": {"type": "dict", "description": "t", "properties": {}}}, required=["target"])
    truth = [{"move": {"target": [{"point": [{"x": 1.5, "y": 2}], "speed": ["fast"]}]}}]

    def check(target):
        return check_calls("simple", [position], [ToolCall("move", {"target": target})], truth).correct

    assert check({"point": {"x": 1.5, "y": 2}, "speed": "FAST"})
    assert not check({"point": {"x": 1.5, "y": 3}, "speed": "fast"})
    assert not check({"point": {"x": 1.5}, "speed": "fast"})


def test_value_listed_in_ground_truth_is_accepted_despite_schema_type():
    """BFCL 'variable' answers: the ground truth may name a variable, or allow null, for a typed parameter."""
    f = function("solve", {"n": {"type": "integer", "description": "n"}, "tag": {"type": "string", "description": "t"}})
    truth = [{"solve": {"n": ["num_items", ""], "tag": [None, "x", ""]}}]
    assert check_calls("simple", [f], [ToolCall("solve", {"n": "num_items"})], truth).correct
    assert check_calls("simple", [f], [ToolCall("solve", {"tag": None})], truth).correct
    assert not check_calls("simple", [f], [ToolCall("solve", {"n": "Num Items"})], truth).correct  # exact only
    assert not check_calls("simple", [f], [ToolCall("solve", {"n": ""})], truth).correct  # "" is the omission marker
    assert not check_calls("simple", [f], [ToolCall("solve", {"tag": 0})], truth).correct


def test_json_schema_type_names_and_any():
    f = function(
        "g",
        {
            "x": {"type": "number"},
            "o": {"type": "object", "properties": {"k": {"type": "boolean"}}},
            "a": {"type": "any"},
        },
        schema_type="object",
    )
    truth = [{"g": {"x": [2.0], "o": [{"k": [True]}], "a": [[1, "b"], "z"]}}]

    def check(**arguments):
        return check_calls("simple", [f], [ToolCall("g", arguments)], truth).correct

    assert check(x=2, o={"k": True}, a=[1, "B"])
    assert check(x=2.0, o={"k": True}, a="Z")
    assert not check(x=2, o={"k": 1}, a="z")
    assert not check(x="2", o={"k": True}, a="z")


def test_unknown_schema_type_is_a_data_error():
    f = function("h", {"x": {"type": "quaternion"}})
    with pytest.raises(ValueError, match="quaternion"):
        check_calls("simple", [f], [ToolCall("h", {"x": 1})], [{"h": {"x": [1]}}])


def test_ground_truth_naming_an_unoffered_function_is_a_data_error():
    with pytest.raises(ValueError, match="not among the offered functions"):
        check_calls("simple", [AREA], area(base=10, height=5.0), [{"calc_volume": {"base": [10]}}])


# ----------------------------------------------------------------- other categories


VOLUME = function("calc_volume", {"side": {"type": "float", "description": "s"}}, required=["side"])


def test_multiple_requires_the_right_function_among_several():
    truth = [{"calc_volume": {"side": [2.0]}}]
    assert check_calls("multiple", [AREA, VOLUME], [ToolCall("calc_volume", {"side": 2})], truth).correct
    result = check_calls("multiple", [AREA, VOLUME], area(base=10, height=5.0), truth)
    assert not result.correct and "calc_area" in result.reason
    two = [ToolCall("calc_volume", {"side": 2.0}), ToolCall("calc_volume", {"side": 2.0})]
    assert not check_calls("multiple", [AREA, VOLUME], two, truth).correct


PARALLEL_TRUTH = [
    {"calc_area": {"base": [10], "height": [5.0], "unit": ["cm", ""]}},
    {"calc_area": {"base": [3], "height": [4.0]}},
]


@pytest.mark.parametrize("category", ["parallel", "live_parallel"])
def test_parallel_is_order_free(category):
    first, second = ToolCall("calc_area", {"base": 10, "height": 5.0}), ToolCall("calc_area", {"base": 3, "height": 4})
    assert check_calls(category, [AREA], [first, second], PARALLEL_TRUTH).correct
    assert check_calls(category, [AREA], [second, first], PARALLEL_TRUTH).correct


def test_parallel_with_a_missing_or_duplicated_call_is_rejected():
    first, second = ToolCall("calc_area", {"base": 10, "height": 5.0}), ToolCall("calc_area", {"base": 3, "height": 4})
    missing = check_calls("parallel", [AREA], [second], PARALLEL_TRUTH)
    assert not missing.correct and "expected 2 call(s), got 1" in missing.reason
    duplicated = check_calls("parallel", [AREA], [first, first], PARALLEL_TRUTH)
    assert not duplicated.correct and "no call matches expected call 1" in duplicated.reason
    extra = check_calls("parallel", [AREA], [first, second, second], PARALLEL_TRUTH)
    assert not extra.correct


def test_parallel_pairs_one_to_one_even_when_greedy_pairing_would_fail():
    """Expected call 0 accepts base 10 or 3, call 1 only base 10: only the pairing (0->3, 1->10) works."""
    truth = [{"calc_area": {"base": [10, 3], "height": [5.0]}}, {"calc_area": {"base": [10], "height": [5.0]}}]
    calls = [ToolCall("calc_area", {"base": 10, "height": 5.0}), ToolCall("calc_area", {"base": 3, "height": 5.0})]
    assert check_calls("parallel", [AREA], calls, truth).correct
    both_ten = [calls[0], calls[0]]
    truth_needs_three = [
        {"calc_area": {"base": [10, 3], "height": [5.0]}},
        {"calc_area": {"base": [3], "height": [5.0]}},
    ]
    result = check_calls("parallel", [AREA], both_ten, truth_needs_three)
    assert not result.correct


def test_calls_that_cannot_be_paired_one_to_one_are_rejected_with_a_reason():
    truth = [{"calc_area": {"base": [10, 3], "height": [5.0]}}, {"calc_area": {"base": [10], "height": [5.0]}}]
    calls = [ToolCall("calc_area", {"base": 10, "height": 5.0}), ToolCall("calc_area", {"base": 7, "height": 5.0})]
    result = check_calls("parallel", [AREA], calls, truth)
    assert not result.correct and "one-to-one" in result.reason


@pytest.mark.parametrize("category", ["parallel_multiple", "live_parallel_multiple"])
def test_parallel_multiple_mixes_functions_in_any_order(category):
    truth = [{"calc_area": {"base": [10], "height": [5.0]}}, {"calc_volume": {"side": [2.0]}}]
    good = [ToolCall("calc_volume", {"side": 2.0}), ToolCall("calc_area", {"base": 10, "height": 5.0})]
    assert check_calls(category, [AREA, VOLUME], good, truth).correct
    wrong = [ToolCall("calc_area", {"base": 10, "height": 5.0}), ToolCall("calc_area", {"base": 10, "height": 5.0})]
    result = check_calls(category, [AREA, VOLUME], wrong, truth)
    assert not result.correct and "no call to 'calc_volume'" in result.reason


@pytest.mark.parametrize("category", ["irrelevance", "live_irrelevance"])
def test_irrelevance_passes_only_without_calls(category):
    assert check_calls(category, [AREA], None, None).correct
    assert check_calls(category, [AREA], [], None).correct
    result = check_calls(category, [AREA], area(base=10, height=5.0), None)
    assert not result.correct and "calc_area" in result.reason


def test_relevance_passes_when_any_call_decodes():
    assert check_calls("live_relevance", [AREA], [ToolCall("anything", {})], None).correct
    assert not check_calls("live_relevance", [AREA], None, None).correct
    assert not check_calls("live_relevance", [AREA], [], None).correct


def test_unknown_category_and_missing_ground_truth_raise():
    with pytest.raises(ValueError, match="unsupported BFCL category"):
        check_calls("java", [AREA], [], AREA_TRUTH)
    with pytest.raises(ValueError, match="needs a ground truth"):
        check_calls("simple", [AREA], [], None)


@pytest.mark.parametrize(
    "question_id, category",
    [
        ("simple_0", "simple"),
        ("simple_python_12", "simple"),
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


@pytest.mark.parametrize("question_id", ["simple", "simple_java_3", "multi_turn_composite_0", "parallel-3", "12"])
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
        ({**OTHER, "function": [function("f", {"x": {"type": "complex"}})]}, "unsupported type 'complex'"),
        ({**OTHER, "function": [function("f", {"x": {"type": "array", "items": {"type": "set"}}})]}, "items"),
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
        "correct": 2,
        "total": 3,
        "missing": 1,
    }
    (item,) = [item for item in data["items"] if item["id"] == "simple_2"]
    assert {"category": "simple", "correct": False, "missing": False}.items() <= item.items()
    assert "expected integer" in item["reason"]
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
    assert as_text.items == as_calls.items
    assert as_text.items[0].correct


def test_score_rejects_inconsistent_inputs():
    question = Question("simple_0", "simple", [], [AREA])
    with pytest.raises(ValueError, match="no questions"):
        bfcl.score([], {}, {})
    with pytest.raises(ValueError, match="'simple_0'.*needs a ground truth"):
        bfcl.score([question], {}, {"simple_0": "calc_area(base=10, height=5)"})
    with pytest.raises(ValueError, match="'simple_0'.*not among the offered functions"):
        bfcl.score([question], {"simple_0": [{"other": {}}]}, {})
    with pytest.raises(ValueError, match="appears twice"):
        bfcl.score([question, question], {"simple_0": AREA_TRUTH}, {})


def test_bootstrap_interval_brackets_the_accuracy_and_narrows_with_more_questions():
    assert bfcl.bootstrap_interval([True] * 7) == (1.0, 1.0)
    assert bfcl.bootstrap_interval([False] * 3) == (0.0, 0.0)
    low, high = bfcl.bootstrap_interval([True, False] * 10)
    assert 0.25 < low < 0.5 < high < 0.75
    wide = bfcl.bootstrap_interval([True, False] * 5)
    assert wide[0] < low and wide[1] > high
    assert bfcl.bootstrap_interval([True, False] * 10, level=0.5)[0] > low
    assert bfcl.bootstrap_interval([True, False] * 10) == (low, high)  # seeded
    # The binomial standard error of 0.5 over 20 questions is 0.112: a 95% interval is about +-0.22.
    assert high - low == pytest.approx(2 * 1.96 * 0.1118, abs=0.06)
    with pytest.raises(ValueError, match="no outcomes"):
        bfcl.bootstrap_interval([])
    with pytest.raises(ValueError, match="level"):
        bfcl.bootstrap_interval([True], level=1.0)
