"""Our single-turn BFCL scores against bfcl-eval's own checker, on bfcl-eval's own data.

For every single-turn category, calls are built from the ground truths (the first acceptable value of each
parameter, left out where "" is acceptable; Java and JavaScript values written as the strings those languages'
type converters read) and from perturbations of them; they are rendered as a model emits them, scored through
our path (`bfcl.score` on questions, answers and raw texts, decoded by `parse_tool_calls`), and each verdict must
equal bfcl-eval's checker called directly on BFCL's decoded form of the same calls, with BFCL's own loading of
its questions and answers; each family's counts are pinned too (an all-False or all-True checker fails)."""

import collections
import copy
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from hephaestus_jax import command
from hephaestus_jax.eval import bfcl, bfcl_checker, bfcl_files, function_calling, tool_docs

bfcl_utils = pytest.importorskip("bfcl_eval.utils")
from bfcl_eval.constants.enums import Language  # noqa: E402

DATA = os.path.join(os.path.dirname(bfcl_utils.__file__), "data")
BFCL_CATEGORIES = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
                   "irrelevance", "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
                   "live_irrelevance", "live_relevance")
LANGUAGES = {"simple_java": Language.JAVA, "simple_javascript": Language.JAVASCRIPT}
QUESTION_COUNTS = {"simple_python": 400, "simple_java": 100, "simple_javascript": 50, "multiple": 200,
                   "parallel": 200, "parallel_multiple": 200, "irrelevance": 240, "live_simple": 258,
                   "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24, "live_irrelevance": 884,
                   "live_relevance": 16}
NO_CALL = "None of the functions fits this request."
OMIT = object()


class Case:
    """One question: BFCL's own entry (question, functions without hints), its ground truth, and ours."""

    def __init__(self, question, entry, ground_truth):
        self.question, self.entry, self.ground_truth = question, entry, ground_truth
        self.category = bfcl_utils.extract_test_category_from_id(entry["id"])
        self.documents = {function["name"]: function for function in entry["function"]}


@pytest.fixture(scope="module")
def cases():
    questions, answers = function_calling.load_bfcl(DATA)
    ours = {question.id: question for question in questions}
    assert set(answers) <= set(ours)
    found = []
    for category in BFCL_CATEGORIES:
        entries = bfcl_utils.load_dataset_entry(category, include_prereq=False, include_language_specific_hint=False)
        truths = ({} if bfcl_utils.is_relevance_or_irrelevance(category) else
                  {t["id"]: t["ground_truth"] for t in bfcl_utils.load_ground_truth_entry(category)})
        assert len(entries) == QUESTION_COUNTS[category]
        for entry in entries:
            question = ours.pop(entry["id"])
            assert question.functions == entry["function"] and question.turns == entry["question"]
            assert answers.get(entry["id"]) == truths.get(entry["id"])
            found.append(Case(question, entry, truths.get(entry["id"])))
    # Every single-turn question of bfcl-eval's data directory; the rest are its multi-turn questions.
    assert {question.category for question in ours.values()} == set(bfcl_files.MULTI_TURN_CATEGORIES)
    return found


# ------------------------------------------------------------------------------- building calls


def first_value(acceptable):
    """The first acceptable value; OMIT where "" (the parameter may be left out) is acceptable, or nothing is."""
    if "" in acceptable or not acceptable:
        return OMIT
    return acceptable[0]


def keywise(options):
    """A value from a dict ground truth, which holds each key's acceptable values."""
    picked = {key: first_value(values) for key, values in options.items()}
    return {key: value for key, value in picked.items() if value is not OMIT}


def shaped(value, schema):
    """A ground-truth value as the call carries it: dicts (and lists of dicts) hold acceptable values per key."""
    if isinstance(value, dict):
        return keywise(value)
    if isinstance(value, list) and schema.get("items", {}).get("type") == "dict":
        return [keywise(item) if isinstance(item, dict) else item for item in value]
    return value


def java_text(value, schema):
    """A Java value as the string BFCL's Java type converter reads back (its `java_type_converter`)."""
    kind = schema.get("type")
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "long":
        return f"{value}L"
    if kind == "float":
        return f"{value}f"
    if isinstance(value, str):  # a String, or a variable's name for any type
        return value
    if kind == "ArrayList":
        items = schema["items"]["type"]
        return f"new ArrayList<>(Arrays.asList({', '.join(java_element(v, items) for v in value)}))"
    if kind == "Array":
        items = schema["items"]["type"]
        return f"new {items}[]{{{', '.join(java_text(v, {'type': items}) for v in value)}}}"
    if kind == "HashMap":
        puts = " ".join(f'put("{key}", {java_element(v, None)});' for key, v in value.items())
        return f"new HashMap<String, Object>() {{{{ {puts} }}}}"
    return str(value)


def java_element(value, kind):
    if isinstance(value, str) and kind in ("String", "char", None):
        return f'"{value}"'
    return java_text(value, {"type": kind})


def js_text(value, schema):
    """A JavaScript value as the string BFCL's JavaScript type converter reads back (`js_type_converter`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if schema.get("type") == "Bigint":
        return f"{value}n"
    if isinstance(value, list):
        return "[" + ", ".join(js_element(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {js_element(v)}" for key, v in value.items()) + "}"
    return str(value)


def js_element(value):
    return f'"{value}"' if isinstance(value, str) else js_text(value, {})


TEXT_OF = {"simple_java": java_text, "simple_javascript": js_text}


def ground_truth_calls(case):
    calls = []
    for entry in case.ground_truth:
        ((name, parameters),) = entry.items()
        properties = case.documents[name]["parameters"]["properties"]
        arguments = {}
        for parameter, acceptable in parameters.items():
            value = first_value(acceptable)
            if value is not OMIT:
                arguments[parameter] = shaped(value, properties.get(parameter, {}))  # (a few name none)
        calls.append({name: arguments})
    return calls


def in_language(case, calls):
    """Calls with Java/JavaScript values written as strings, as BFCL asks those models for them."""
    text_of = TEXT_OF.get(case.category)
    if text_of is None:
        return calls
    out = []
    for call in calls:
        ((name, arguments),) = call.items()
        properties = case.documents[name]["parameters"]["properties"]
        out.append({name: {key: text_of(value, properties.get(key, {})) for key, value in arguments.items()}})
    return out


def other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7919
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "Qz9"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["Qz9"]
    if isinstance(value, dict):
        return {**value, "qz9": 1}
    return "Qz9"


def other_type(value):
    return "Qz9" if not isinstance(value, str) else 12345  # Java/JavaScript values are strings: 12345


def with_first_argument(calls, change):
    """The calls with the first argument of the first call that has one changed; None when no call has one."""
    calls = copy.deepcopy(calls)
    for call in calls:
        ((name, arguments),) = call.items()
        if arguments:
            key = next(iter(arguments))
            arguments[key] = change(arguments[key])
            return calls
    return None


def without_a_required(case, calls):
    calls = copy.deepcopy(calls)
    for call in calls:
        ((name, arguments),) = call.items()
        present = [p for p in case.documents[name]["parameters"]["required"] if p in arguments]
        if present:
            del arguments[present[0]]
            return calls
    return None


def renamed(calls):
    calls = copy.deepcopy(calls)
    ((name, arguments),) = calls[0].items()
    calls[0] = {name + "_qz9": arguments}
    return calls


def families(case):
    """{family: BFCL-form calls (None: a text that is no call)} for one question."""
    if bfcl_utils.is_relevance_or_irrelevance(case.category):
        name = case.entry["function"][0]["name"] if case.entry["function"] else "lookup"
        return {"no call": None, "empty list": [], "a call": [{name: {}}]}
    calls = in_language(case, ground_truth_calls(case))
    out = {
        "ground truth": calls,
        "wrong value": with_first_argument(calls, other_value),
        "wrong type": with_first_argument(calls, other_type),
        "missing required": without_a_required(case, calls),
        "extra parameter": [{**calls[0], next(iter(calls[0])): {**next(iter(calls[0].values())), "qz9_extra": 1}},
                            *calls[1:]],
        "wrong function": renamed(calls),
        "no call": None,
    }
    if "parallel" in case.category:
        out["call dropped"] = calls[:-1]
        out["call duplicated"] = [*calls, calls[0]]
    return {family: calls for family, calls in out.items() if calls is not None or family == "no call"}


def rendered(calls, index):
    """The text a model emits for `calls`: Hermes <tool_call> blocks, or Llama-3.1's JSON after <|python_tag|>."""
    if calls is None:
        return NO_CALL
    if not calls:
        return "[]"
    objects = [{"name": name, ("arguments" if index % 2 else "parameters"): arguments}
               for call in calls for name, arguments in call.items()]
    if index % 2:
        return "\n".join(f"<tool_call>\n{json.dumps(o)}\n</tool_call>" for o in objects)
    return "<|python_tag|>" + "; ".join(json.dumps(o) for o in objects)


# ------------------------------------------------------------------------------- bfcl-eval's verdict


def reference(case, calls):
    """(valid, error_type) of bfcl-eval's eval_runner for decoded `calls` (None: the decoder failed)."""
    category = case.category
    if bfcl_utils.is_relevance_or_irrelevance(category):
        made_a_call = calls is not None and not bfcl_utils.is_empty_output(calls)
        if "irrelevance" in category:
            return (True, "") if not made_a_call else (False, "irrelevance_error:decoder_success")
        return (True, "") if made_a_call else (False, "relevance_error:decoder_failed")
    if calls is None:
        return False, "ast_decoder:decoder_failed"
    assert bfcl_utils.is_function_calling_format_output(calls)
    checker = sys.modules["bfcl_eval.eval_checker.ast_eval.ast_checker"]
    result = checker.ast_checker(case.entry["function"], copy.deepcopy(calls), case.ground_truth,
                                 LANGUAGES.get(category, Language.PYTHON), category, bfcl_checker.MODEL_NAME)
    return result["valid"], "" if result["valid"] else result["error_type"]


# Per family and category, (questions BFCL's checker accepts, questions): a pin, so that an all-True or all-False
# checker, or a family that stopped perturbing, fails here as well as in the comparison. BFCL itself rejects 19
# ground-truth calls: a required parameter whose acceptable values include "" (left out, as built here), its greedy
# pairing of parallel calls (parallel_88: the first expected call takes the call the second needed), Java String
# lists it does not read back, a ground truth naming a parameter outside the schema. It accepts 19 "wrong values":
# its Java collection readers search the text, so a suffix after the literal goes unseen.
EXPECTED_CORRECT = {
    "a call": {"irrelevance": (0, 240), "live_irrelevance": (0, 884), "live_relevance": (16, 16)},
    "call dropped": {"parallel": (0, 200), "parallel_multiple": (0, 200), "live_parallel": (0, 16),
        "live_parallel_multiple": (0, 24)},
    "call duplicated": {"parallel": (0, 200), "parallel_multiple": (0, 200), "live_parallel": (0, 16),
        "live_parallel_multiple": (0, 24)},
    "empty list": {"irrelevance": (240, 240), "live_irrelevance": (884, 884), "live_relevance": (0, 16)},
    "extra parameter": {"simple_python": (0, 400), "simple_java": (0, 100), "simple_javascript": (0, 50),
        "multiple": (0, 200), "parallel": (0, 200), "parallel_multiple": (0, 200), "live_simple": (0, 258),
        "live_multiple": (0, 1053), "live_parallel": (0, 16), "live_parallel_multiple": (0, 24)},
    "ground truth": {"simple_python": (398, 400), "simple_java": (98, 100), "simple_javascript": (50, 50),
        "multiple": (200, 200), "parallel": (199, 200), "parallel_multiple": (198, 200), "live_simple": (256, 258),
        "live_multiple": (1042, 1053), "live_parallel": (16, 16), "live_parallel_multiple": (24, 24)},
    "missing required": {"simple_python": (0, 400), "simple_java": (0, 100), "simple_javascript": (0, 50),
        "multiple": (0, 200), "parallel": (0, 200), "parallel_multiple": (0, 200), "live_simple": (0, 235),
        "live_multiple": (0, 840), "live_parallel": (0, 16), "live_parallel_multiple": (0, 24)},
    "no call": {"simple_python": (0, 400), "simple_java": (0, 100), "simple_javascript": (0, 50),
        "multiple": (0, 200), "parallel": (0, 200), "parallel_multiple": (0, 200), "irrelevance": (240, 240),
        "live_simple": (0, 258), "live_multiple": (0, 1053), "live_parallel": (0, 16),
        "live_parallel_multiple": (0, 24), "live_irrelevance": (884, 884), "live_relevance": (0, 16)},
    "wrong function": {"simple_python": (0, 400), "simple_java": (0, 100), "simple_javascript": (0, 50),
        "multiple": (0, 200), "parallel": (0, 200), "parallel_multiple": (0, 200), "live_simple": (0, 258),
        "live_multiple": (0, 1053), "live_parallel": (0, 16), "live_parallel_multiple": (0, 24)},
    "wrong type": {"simple_python": (0, 400), "simple_java": (0, 100), "simple_javascript": (0, 50),
        "multiple": (0, 200), "parallel": (0, 200), "parallel_multiple": (0, 200), "live_simple": (0, 257),
        "live_multiple": (0, 1022), "live_parallel": (0, 16), "live_parallel_multiple": (0, 24)},
    "wrong value": {"simple_python": (0, 400), "simple_java": (10, 100), "simple_javascript": (8, 50),
        "multiple": (0, 200), "parallel": (0, 200), "parallel_multiple": (0, 200), "live_simple": (0, 257),
        "live_multiple": (1, 1022), "live_parallel": (0, 16), "live_parallel_multiple": (0, 24)},
}


def test_every_verdict_equals_bfcl_evals_checker(cases):
    by_family = collections.defaultdict(dict)
    for index, case in enumerate(cases):
        for family, calls in families(case).items():
            by_family[family][case.question.id] = (case, calls, rendered(calls, index))
    counts = collections.defaultdict(collections.Counter)
    for family, members in sorted(by_family.items()):
        questions = [case.question for case, _, _ in members.values()]
        answers = {case.question.id: case.ground_truth for case, _, _ in members.values() if case.ground_truth}
        report = bfcl.score(questions, answers, {qid: text for qid, (_, _, text) in members.items()})
        for item in report.items:
            case, calls, text = members[item.id]
            expected = reference(case, calls)
            assert (item.correct, item.error_type) == expected, (family, item.id, text, item.reason)
            assert bool(item.reason) == (not item.correct)
            counts[family][case.category, item.correct] += 1
    summary = {family: {category: (c[category, True], c[category, True] + c[category, False])
                        for category in BFCL_CATEGORIES if c[category, True] + c[category, False]}
               for family, c in counts.items()}
    assert summary == EXPECTED_CORRECT


def test_functions_are_shown_as_bfcl_shows_them(cases):
    """The prompt's functions are bfcl-eval's own language-specific pre-processing of the question's (its
    generation loads them with hints), then JSON-schema types: Java and JavaScript parameters are strings."""
    hinted = {entry["id"]: entry["function"] for category in BFCL_CATEGORIES
              for entry in bfcl_utils.load_dataset_entry(category, include_prereq=False)}
    for case in cases:
        assert bfcl_checker.shown_functions(case.question) == hinted[case.entry["id"]], case.entry["id"]
        assert case.question.functions == case.entry["function"]  # the checker's copy is left as it was
    java = next(case for case in cases if case.category == "simple_java" and case.entry["id"] == "simple_java_1")
    tool = tool_docs.tool_doc(bfcl_checker.shown_functions(java.question)[0], "test")
    assert {schema["type"] for schema in tool.parameters["properties"].values()} == {"string"}
    assert tool.description.endswith("Note that the provided function is in Java 8 SDK syntax.")
    assert "This is Java HashMap type parameter in string representation." in (
        tool.parameters["properties"]["params"]["description"])
    python = next(case for case in cases if case.entry["id"] == "simple_python_0")
    tool = tool_docs.tool_doc(bfcl_checker.shown_functions(python.question)[0], "test")
    assert tool.description.endswith("Note that the provided function is in Python 3 syntax.")
    floats = next((case, function) for case in cases for function in case.entry["function"]
                  if any(p.get("type") == "float" for p in function["parameters"]["properties"].values()))
    tool = tool_docs.tool_doc(floats[1], "test")  # BFCL's convert_to_tool notes floats in the description
    assert [p["description"].endswith(" This is a float type value.") for p in tool.parameters["properties"].values()
            ] == [p.get("type") == "float" for p in floats[1]["parameters"]["properties"].values()]


def test_without_bfcl_eval_the_package_imports_and_the_checker_names_the_extra(tmp_path):
    """A fresh process: with bfcl-eval hidden, our modules import and checking raises MissingExtra's one line;
    with it, the checker loads through the model_config stand-in, which is gone afterwards, and keeps dotted
    function names (a local model's)."""
    script = """
import sys
sys.modules["bfcl_eval"] = None
from hephaestus_jax.errors import MissingExtra
from hephaestus_jax.eval import bfcl, bfcl_checker, bfcl_files
question = bfcl_files.Question("simple_0", "simple", [[]], [{"name": "math.hypot", "description": "d",
    "parameters": {"type": "dict", "properties": {"x": {"type": "integer", "description": "x"}}, "required": ["x"]}}])
truth = [{"math.hypot": {"x": [3]}}]
try:
    bfcl.score([question], {"simple_0": truth}, {"simple_0": "[math.hypot(x=3)]"})
except MissingExtra as error:
    print("missing:", error)
del sys.modules["bfcl_eval"]
report = bfcl.score([question], {"simple_0": truth}, {"simple_0": "[math.hypot(x=3)]"})
print("correct:", report.items[0].correct, "bfcl_eval.constants.model_config" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"missing: bfcl_eval is not installed: {command.INSTALL_APART['bfcl_eval']}",
                                       "correct: True False"]



def test_a_directory_loads_bfcl_v3_and_v4_files_skipping_what_does_not_run_here(tmp_path, caplog):
    (tmp_path / "possible_answer").mkdir()
    fixtures = os.path.join(REPO_ROOT, "tests", "fixtures", "bfcl")
    for source, name in [(fixtures, "BFCL_v3_simple.json"), (DATA, "BFCL_v4_simple_java.json"),
                         (DATA, "BFCL_v4_multi_turn_base.json"), (DATA, "BFCL_v4_format_sensitivity.json")]:
        for folder in ("", "possible_answer"):
            if os.path.exists(os.path.join(source, folder, name)):
                shutil.copy(os.path.join(source, folder, name), tmp_path / folder / name)
    with caplog.at_level(logging.INFO, logger="hephaestus_jax.eval.function_calling"):
        questions, answers = function_calling.load_bfcl(str(tmp_path))
    assert collections.Counter(q.category for q in questions) == {"simple": 3, "simple_java": 100,
                                                                  "multi_turn_base": 200}
    assert set(answers) == {q.id for q in questions}
    assert "skipping BFCL_v4_format_sensitivity.json" in caplog.text and "multi_turn" not in caplog.text
