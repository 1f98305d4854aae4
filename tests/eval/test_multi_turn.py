"""BFCL's multi-turn loop and checking (eval/multi_turn.py), driven by scripted model texts: the ground truth's
calls of real questions pass BFCL's own multi_turn_checker, perturbed ones fail it, and our `check` gives the
verdict of bfcl-eval's multi_turn_checker called directly on the decoded calls."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import uuid

import pytest
import tokenizers

from hephaestus_jax.data import forge
from hephaestus_jax.data.chat_format import resolve_chat_format
from hephaestus_jax.data.chat_text import render_chatml_tool_calls
from hephaestus_jax.data.vocab import load_vocabulary
from hephaestus_jax.eval import bfcl_files, multi_turn
from support.bfcl_multi_turn import bfcl_decode, bfcl_verdict
from support.smollm2_files import smollm2_hf_dir, smollm2_tokenizer_dir  # noqa: F401 (fixtures)

bfcl_eval = pytest.importorskip("bfcl_eval", reason="pip install --no-deps bfcl-eval (README's test command)")
from bfcl_eval.constants.default_prompts import (  # noqa: E402
    DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC, MAXIMUM_STEP_LIMIT)
from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING  # noqa: E402
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call  # noqa: E402

DATA = os.path.join(os.path.dirname(bfcl_eval.__file__), "data")
ANSWER = "Done."
SCRIPTED = ["multi_turn_base_0", "multi_turn_base_7", "multi_turn_miss_func_0", "multi_turn_miss_func_12",
            "multi_turn_miss_param_3", "multi_turn_long_context_0", "multi_turn_long_context_21"]


@pytest.fixture(scope="module")
def dataset():
    questions, answers = {}, {}
    for category in bfcl_files.MULTI_TURN_CATEGORIES:
        questions.update((q.id, q) for q in bfcl_files.load_questions(os.path.join(DATA, f"BFCL_v4_{category}.json")))
        answers.update(bfcl_files.load_answers(os.path.join(DATA, "possible_answer", f"BFCL_v4_{category}.json")))
    return questions, answers


@pytest.fixture(scope="module")
def renderer(smollm2_tokenizer_dir):  # noqa: F811
    return resolve_chat_format(load_vocabulary(smollm2_tokenizer_dir))


# ------------------------------------------------------------------------------------------- helpers


def tool_call(question, text: str) -> forge.ToolCall:
    """A ground-truth call string (positional arguments bound by the back-end method's signature)."""
    node = ast.parse(text, mode="eval").body
    name = node.func.id
    for class_name in question.multi_turn.involved_classes:
        cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
        if hasattr(cls, name):
            signature = inspect.signature(getattr(cls, name))
            break
    arguments = dict(zip(list(signature.parameters)[1:], (ast.literal_eval(arg) for arg in node.args)))
    arguments.update((keyword.arg, ast.literal_eval(keyword.value)) for keyword in node.keywords)
    return forge.ToolCall(name, arguments)


def script_of(question, ground_truth):
    """The model's texts per turn: even turns make all their calls in one step, odd turns one call per step; each
    turn ends with a plain answer."""
    turns = []
    for index, turn in enumerate(ground_truth):
        calls = [tool_call(question, text) for text in turn]
        steps = [calls] if index % 2 == 0 and calls else [[call] for call in calls]
        turns.append([render_chatml_tool_calls(step) for step in steps] + [ANSWER])
    return turns


class ScriptedModel:
    """`complete` that answers each conversation from its script, in the loop's order (conversations in question
    order, each until its script ends); it records what each prompt showed."""

    def __init__(self, vocab, scripts: dict[str, list[list[str]]]):
        self.tokenizer = tokenizers.Tokenizer.from_file(str(vocab.path))  # Decodes all, <|im_end|> included.
        self.remaining = {key: [text for turn in script for text in turn] for key, script in scripts.items()}
        self.prompts: dict[str, list[str]] = {key: [] for key in scripts}
        self.sizes: dict[str, list[int]] = {key: [] for key in scripts}
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        active = [key for key, texts in self.remaining.items() if texts]
        assert len(prompts) == len(active)
        for key, prompt in zip(active, prompts):
            self.prompts[key].append(self.tokenizer.decode(prompt.tolist(), skip_special_tokens=False))
            self.sizes[key].append(prompt.size)
        return [self.remaining[key].pop(0) for key in active]


def run(dataset, renderer, scripts, **kwargs):
    questions, _ = dataset
    model = ScriptedModel(renderer.vocab, scripts)
    conversations = multi_turn.run_multi_turn([questions[key] for key in scripts], renderer, model,
                                              context_length=1 << 20, **kwargs)
    return model, conversations


# --------------------------------------------------------------------------------------------- tests


def test_constants_are_bfcl_s():
    assert multi_turn.MAXIMUM_STEP_LIMIT == MAXIMUM_STEP_LIMIT
    assert multi_turn.ADDED_FUNCTIONS_MESSAGE == DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC


def test_ground_truth_scripts_pass_bfcl_and_our_check_agrees(dataset, renderer):
    questions, answers = dataset
    scripts = {key: script_of(questions[key], answers[key]) for key in SCRIPTED}
    model, conversations = run(dataset, renderer, scripts)
    assert model.calls == max(sum(map(len, script)) for script in scripts.values())  # One call per step, batched.
    for key, script in scripts.items():
        question, conversation = questions[key], conversations[key]
        assert conversation.error == ""
        assert conversation.bfcl_result() == script
        assert multi_turn.check(question, answers[key], conversation.bfcl_result()) == bfcl_files.Verdict(True)
        assert bfcl_verdict(question, answers[key], script) == (True, "")
        # The record: each step's decoded calls, and BFCL's executor's results for them, replayed here.
        name = f"replay_{uuid.uuid4().hex}"
        long_context = "long_context" in question.category
        for turn in conversation.turns:
            for step in turn:
                calls = [forge.ToolCall(**call) for call in step["calls"] or []]
                expected, _ = execute_multi_turn_func_call(
                    bfcl_decode(render_chatml_tool_calls(calls)) if calls else [],
                    question.multi_turn.initial_config, list(question.multi_turn.involved_classes), name, key,
                    long_context=long_context)
                assert step["results"] == expected
                assert (step["calls"] is None) == (step["text"] == ANSWER)


def test_each_prompt_shows_the_previous_step_s_results(dataset, renderer):
    questions, answers = dataset
    key = "multi_turn_base_7"
    model, conversations = run(dataset, renderer, {key: script_of(questions[key], answers[key])})
    steps = [step for turn in conversations[key].turns for step in turn]
    assert len(model.prompts[key]) == len(steps)
    for prompt, previous in zip(model.prompts[key][1:], steps):
        for result in previous["results"]:
            assert f"<tool_response>\n{result}\n</tool_response>" in prompt
        if previous["calls"]:
            assert prompt.count("<tool_call>") >= len(previous["calls"]) + 1  # Shown, besides the system prompt's.
    for question_turn in questions[key].turns:
        assert question_turn[0]["content"] in model.prompts[key][-1]


def test_miss_func_functions_arrive_at_bfcl_s_turn_with_bfcl_s_message(dataset, renderer):
    questions, answers = dataset
    key = "multi_turn_miss_func_0"
    question = questions[key]
    ((turn, (added,)),) = question.multi_turn.added_functions.items()
    assert added["name"] == "sort" and "sort" not in {f["name"] for f in question.functions}
    model, conversations = run(dataset, renderer, {key: script_of(question, answers[key])})
    steps_before = sum(len(t) for t in conversations[key].turns[:turn])
    for index, prompt in enumerate(model.prompts[key]):
        offered = '"name": "sort"' in prompt
        asked = DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC in prompt
        assert offered == asked == (index >= steps_before), index
    assert question.turns[turn] == []


def test_step_limit_force_quits_the_conversation_as_bfcl(dataset, renderer):
    questions, answers = dataset
    key = "multi_turn_base_0"
    looping = render_chatml_tool_calls([forge.ToolCall("ls", {})])
    for limit in (MAXIMUM_STEP_LIMIT, 2):
        kwargs = {} if limit == MAXIMUM_STEP_LIMIT else {"step_limit": limit}
        model, conversations = run(dataset, renderer, {key: [[looping] * 100]}, **kwargs)
        (turn,) = conversations[key].turns  # BFCL: `count > MAXIMUM_STEP_LIMIT` ends the whole conversation.
        assert len(turn) == limit + 1 == model.calls
        verdict = multi_turn.check(questions[key], answers[key], conversations[key].bfcl_result())
        assert verdict == bfcl_files.Verdict(
            False, "Model was force-terminated during inference phase. The length of the model result turns (1) "
                   "does not match the length of the ground truth turns (4).", "multi_turn:force_terminated")


def test_a_prompt_beyond_the_context_ends_as_bfcl_s_inference_error(dataset, renderer):
    questions, answers = dataset
    key = "multi_turn_base_0"
    question = questions[key]
    model = ScriptedModel(renderer.vocab, {key: script_of(question, answers[key])})
    first = multi_turn.run_multi_turn([question], renderer, model, context_length=1 << 20)[key]
    assert first.error == ""
    prompt_size = model.sizes[key][0]
    for context, steps in ((prompt_size + 1, 0), (prompt_size + 2, 1)):  # BFCL: fails when context < size + 2.
        model = ScriptedModel(renderer.vocab, {key: [[ANSWER]]})
        conversation = multi_turn.run_multi_turn([question], renderer, model, context_length=context)[key]
        assert model.calls == steps  # With room for the first prompt, the second turn's longer one overflows.
        assert [[step["text"] for step in turn] for turn in conversation.turns] == [[ANSWER] * steps, []][1 - steps:]
        assert conversation.error.startswith("the prompt has ")
        assert (f"the prompt has {prompt_size} tokens; the model's context is {context}" == conversation.error) == (
            steps == 0)
        assert conversation.bfcl_result() == "Error during inference: " + conversation.error
        verdict = multi_turn.check(question, answers[key], conversation.bfcl_result())
        assert verdict == bfcl_files.Verdict(
            False, "Error during inference phase. Model did not output a list of model responses.",
            "multi_turn:inference_error")


def perturb(kind: str, question, script):
    script = [list(turn) for turn in script]
    if kind == "wrong argument":  # The first call's first string argument changed.
        for turn in script:
            for index, text in enumerate(turn):
                calls = multi_turn.parse_tool_calls(text)
                for call in calls or []:
                    for name, value in call.arguments.items():
                        if isinstance(value, str):
                            call.arguments[name] = value + "_x"
                            turn[index] = render_chatml_tool_calls(calls)
                            return script
    if kind == "skipped call":  # The last call of the first turn dropped.
        first = [text for text in script[0] if text != ANSWER]
        calls = [call for text in first for call in multi_turn.parse_tool_calls(text)]
        script[0] = [render_chatml_tool_calls(calls[:-1]), ANSWER] if calls[:-1] else [ANSWER]
        return script
    if kind == "extra call":  # A state-changing call added to the first turn.
        extra = forge.ToolCall("touch", {"file_name": "extra.txt"})
        script[0].insert(0, render_chatml_tool_calls([extra]))
        return script
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["wrong argument", "skipped call", "extra call"])
def test_perturbed_scripts_fail_in_our_check_and_in_bfcl_s(dataset, renderer, kind):
    questions, answers = dataset
    keys = ["multi_turn_base_0", "multi_turn_miss_param_3", "multi_turn_long_context_0"]
    scripts = {key: perturb(kind, questions[key], script_of(questions[key], answers[key])) for key in keys}
    _, conversations = run(dataset, renderer, scripts)
    for key in keys:
        texts = conversations[key].bfcl_result()
        verdict = multi_turn.check(questions[key], answers[key], texts)
        assert not verdict.correct and verdict.reason and verdict.error_type.startswith("multi_turn:"), key
        assert bfcl_verdict(questions[key], answers[key], texts) == (False, verdict.error_type), key


def test_calls_that_eval_would_run_as_other_code_are_refused():
    methods = frozenset({"ls", "cd"})
    assert multi_turn.execute_form(forge.ToolCall("cd", {"folder": "a'b"}), methods) == 'cd(folder="a\'b")'
    assert multi_turn.execute_form(forge.ToolCall("undefined_tool", {"x": [1, None]}), methods) == \
        "undefined_tool(x=[1, None])"
    assert multi_turn.execute_form(forge.ToolCall("math.factorial", {"n": 5}), methods) == "math.factorial(n=5)"
    for call in (forge.ToolCall("open", {"file": "x", "mode": "w"}), forge.ToolCall("json.loads", {"s": "1"}),
                 forge.ToolCall("__import__('os').system", {"command": "true"}),
                 forge.ToolCall("ls", {"a=__import__('os').getpid(),b": 1}),
                 forge.ToolCall("ls.__func__.__builtins__.update", {"x": 1})):
        assert multi_turn.execute_form(call, methods) == multi_turn.REFUSED_CALL


def test_check_leaves_out_empty_and_undecodable_steps_as_bfcl(dataset):
    """A turn of `[]` steps and prose is no response at all (BFCL skips such steps before its checker)."""
    questions, answers = dataset
    key = "multi_turn_base_0"
    texts = script_of(questions[key], answers[key])
    texts[0] = ["[]", "[]", "<tool_call>\n{\"name\": \"ls\"", ANSWER]
    verdict = multi_turn.check(questions[key], answers[key], texts)
    assert (verdict.correct, verdict.error_type) == bfcl_verdict(questions[key], answers[key], texts) == (
        False, "multi_turn:empty_turn_model_response")


# ----------------------------------------------------------------------------------------------- loading


def test_multi_turn_questions_load_as_bfcl_s_load_dataset_entry(dataset):
    from bfcl_eval.utils import load_dataset_entry

    questions, answers = dataset
    for category in ("multi_turn_miss_func", "multi_turn_long_context"):
        for entry in load_dataset_entry(category)[:20]:
            question = questions[entry["id"]]
            assert question.functions == entry["function"]  # Hinted, the withheld ones left out.
            assert question.multi_turn.added_functions == {int(turn): functions for turn, functions in
                                                           entry.get("missed_function", {}).items()}
            assert question.multi_turn.involved_classes == tuple(entry["involved_classes"])
            assert question.multi_turn.initial_config == entry["initial_config"]
            assert question.turns == entry["question"]
    assert all(isinstance(call, str) for turn in answers["multi_turn_base_0"] for call in turn)


@pytest.mark.parametrize("change, message", [
    ({"involved_classes": ["NoSuchAPI"]}, "'involved_classes' must list BFCL back-end classes"),
    ({"involved_classes": "GorillaFileSystem"}, "'involved_classes' must list"),
    ({"missed_function": {"first": ["sort"]}}, "'missed_function' must map turn indices"),
    ({"initial_config": []}, "'initial_config' must be an object"),
])
def test_malformed_multi_turn_questions_name_the_line(tmp_path, change, message):
    with open(os.path.join(DATA, "BFCL_v4_multi_turn_miss_func.json")) as f:
        record = json.loads(f.readline())
    path = tmp_path / "q.json"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "id": "multi_turn_miss_func_1", **change}))
    with pytest.raises(bfcl_files.BFCLFormatError, match=f"{path}:2: {message}"):
        bfcl_files.load_questions(path)


def test_multi_turn_answers_must_be_turns_of_call_strings(tmp_path):
    path = tmp_path / "a.json"
    good = {"id": "multi_turn_base_0", "ground_truth": [["ls(a=True)"], []]}
    path.write_text(json.dumps(good) + "\n")
    assert bfcl_files.load_answers(path) == {"multi_turn_base_0": [["ls(a=True)"], []]}
    path.write_text(json.dumps({**good, "ground_truth": [["ls(a=True)"], [{"ls": {}}]]}) + "\n")
    with pytest.raises(bfcl_files.BFCLFormatError, match=f"{path}:1: a multi-turn 'ground_truth' must be"):
        bfcl_files.load_answers(path)


def test_a_scored_run_keeps_records_that_rescore_to_the_same_verdicts(dataset, renderer, tmp_path):
    """bfcl.score on conversations (right and perturbed), as `evaluate function_calling` scores a model's run: its
    records read back (`--predictions`) score the same, as do BFCL's own result forms (texts per turn and step; an
    inference-error string), and the verdicts are bfcl-eval's multi_turn_checker's."""
    from hephaestus_jax.eval import bfcl, function_calling

    questions, answers = dataset
    right, wrong = "multi_turn_base_0", "multi_turn_miss_param_3"
    scripts = {right: script_of(questions[right], answers[right]),
               wrong: script_of(questions[wrong], answers[wrong][:-1] + [[]])}  # The last turn's calls skipped.
    _, conversations = run(dataset, renderer, scripts)
    chosen = [questions[right], questions[wrong], questions["multi_turn_base_1"]]
    predictions = {**conversations, "multi_turn_base_1": "Error during inference: the prompt is too long"}
    report = bfcl.score(chosen, answers, predictions)
    assert [(item.correct, item.error_type) for item in report.items] == [
        (True, ""), bfcl_verdict(questions[wrong], answers[wrong], scripts[wrong]),
        (False, "multi_turn:inference_error")]
    assert not report.items[1].correct
    records = tmp_path / "results.records.jsonl"
    function_calling.write_records(str(records), report)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert lines[0]["turns"] == conversations[right].turns and lines[2]["error"] == "the prompt is too long"
    assert any(step["results"] for turn in lines[0]["turns"] for step in turn)  # Execution results kept.
    rescored = bfcl.score(chosen, answers, bfcl_files.load_predictions(records))
    assert [item.record() for item in rescored.items] == [item.record() for item in report.items]
    as_bfcl = {key: conversation.bfcl_result() for key, conversation in conversations.items()}
    texts_only = bfcl.score(chosen, answers, {**predictions, **as_bfcl})
    assert [item.summary() for item in texts_only.items] == [item.summary() for item in report.items]
