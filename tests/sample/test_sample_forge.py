"""The bundled Forge sample (data/): valid, real, reproducible, and with held-out APIs that training never sees."""

import glob
import inspect
import json
import os
import platform
import sysconfig

import pytest

from conftest import REPO_ROOT
from hephaestus_jax.data import chat_text, forge
from hephaestus_jax.sample import agent_records, build, python_apis
from hephaestus_jax.eval import bfcl, function_calling

DATA = os.path.join(REPO_ROOT, "data")
FORGE = os.path.join(DATA, "forge")


@pytest.fixture(scope="module")
def manifest():
    with open(os.path.join(DATA, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def apis_by_name(manifest):
    return {api.name: api for api in python_apis.discover(manifest["seed"])}


def _records(relative_glob):
    """(path, component, record) for every line of the matching Forge files, read by the real reader."""
    for path in sorted(glob.glob(os.path.join(FORGE, relative_glob))):
        component = os.path.basename(os.path.dirname(path))
        for record in forge.read_records(path, component):
            yield path, component, record


def _tool_names(record):
    """Every tool name a Forge record mentions: documented, offered, or called."""
    if isinstance(record, forge.ToolDoc):
        return {record.name}
    names = {tool.name for tool in getattr(record, "tools", ())}
    for step in getattr(record, "steps", ()):
        if step.call is not None:
            names.add(step.call.name)
    for message in getattr(record, "messages", ()):
        names.update(call.name for call in message.tool_calls)
    return names


def test_every_component_and_split_is_there_and_parses(manifest):
    for component in forge.COMPONENTS:
        for split in ("train", "validation"):
            files = glob.glob(os.path.join(FORGE, component, f"{split}-*.jsonl*"))
            assert files, f"no {component}/{split} files"
            for path in files:
                reader = forge.read_records(path, component)
                count = sum(1 for _ in reader)
                assert count == manifest["files"][os.path.relpath(path, DATA)]["records"] > 0
    for component in ("tool_docs", "trajectories"):
        assert glob.glob(os.path.join(FORGE, "seed", component, "train-*.jsonl"))
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    assert 2_000_000 < total < 10_000_000  # "a few MB"


def test_held_out_apis_never_appear_in_training_and_validation_uses_only_them(manifest):
    train, held_out = set(manifest["apis"]["train"]), set(manifest["apis"]["held_out"])
    assert train and held_out and not train & held_out
    for split, allowed in (("train", train), ("validation", held_out)):
        seen = set()
        for pattern in (f"{c}/{split}-*" for c in ("tool_docs", "trajectories", "sft")):
            for path, _, record in _records(pattern):
                names = _tool_names(record)
                assert names <= allowed, f"{path}: {sorted(names - allowed)} in the {split} split"
                seen |= names
        assert seen == allowed  # every API of the split is documented or used
    for path, _, record in _records("seed/*/train-*"):
        assert _tool_names(record) <= train, path


def test_observations_are_what_the_real_functions_return(apis_by_name):
    calls = 0
    for path, _, record in _records("trajectories/*"):
        for step in record.steps:
            real = apis_by_name[step.call.name].call(dict(step.call.arguments))
            assert step.observation == real.observation, f"{record.origin}: {step.call}"
            calls += 1
    for path, _, record in _records("sft/train-*"):
        pending = []
        for message in record.messages:
            pending += [apis_by_name[c.name].call(dict(c.arguments)) for c in message.tool_calls]
            if message.role == "ipython":
                real = pending.pop(0)
                assert message.content == real.observation, record.origin
    assert calls > 1000


def test_documentation_comes_from_the_real_functions(apis_by_name):
    for path, _, doc in _records("tool_docs/*"):
        api = apis_by_name[doc.name]
        assert doc.description.split() == inspect.getdoc(api.function).split()  # the docstring, verbatim
        assert set(doc.parameters["properties"]) <= set(inspect.signature(api.function).parameters)
        for example in doc.examples:
            assert example.startswith(f"{doc.name}(")
    code = [r for _, _, r in _records("code/train-*")]
    assert all(r.license == "PSF-2.0" and r.path.startswith("Lib/") for r in code)
    root = sysconfig.get_paths()["stdlib"]
    for record in code[:10]:
        with open(os.path.join(root, record.path[len("Lib/"):]), encoding="utf-8") as f:
            assert f.read() == record.text


def test_the_stage_two_seed_subset_is_documented_error_free_training_data(apis_by_name):
    docs = [doc for _, _, doc in _records("seed/tool_docs/train-*")]
    assert docs and all(build.is_seed_quality(apis_by_name[d.name]) for d in docs)
    for _, _, trajectory in _records("seed/trajectories/train-*"):
        assert not any(isinstance(s.observation, dict) and "error" in s.observation for s in trajectory.steps)


def _perfect_output(ground_truth):
    """The reply a perfect model would give: each expected call with the first acceptable value of each
    argument (leaving out the ones that may be omitted: "" among the acceptable values), in the Llama-3.1 tool-call format."""
    calls = []
    for entry in ground_truth:
        (name, parameters), = entry.items()
        calls.append(forge.ToolCall(name, {k: v[0] for k, v in parameters.items() if v[0] != ""}))
    return chat_text.render_tool_calls(calls)


def test_the_bfcl_set_covers_every_category_and_perfect_answers_score_100_percent(manifest, apis_by_name):
    questions, answers = function_calling.load_bfcl(os.path.join(DATA, "eval"))
    held_out = set(manifest["apis"]["held_out"])
    assert {q.category for q in questions} == set(agent_records.BFCL_CATEGORIES)
    predictions = {}
    for question in questions:
        assert {f["name"] for f in question.functions} <= held_out, question.id
        if question.category == "irrelevance":
            predictions[question.id] = "None of the available functions can do this."
            continue
        for entry in answers[question.id]:  # the stated arguments really work
            (name, parameters), = entry.items()
            call = apis_by_name[name].call({k: v[0] for k, v in parameters.items() if v[0] != ""})
            assert call.error is None, (question.id, call)
        predictions[question.id] = _perfect_output(answers[question.id])
    report = bfcl.score(questions, answers, predictions)
    assert all(c.accuracy == 1.0 for c in report.categories if c.total), bfcl.format_table(report)
    wrong = dict(predictions, **{q.id: _perfect_output(answers[q.id])[:-2] for q in questions
                                 if q.category == "simple"})  # a truncated call is wrong
    simple = {c.category: c for c in bfcl.score(questions, answers, wrong).categories}["simple"]
    assert simple.total == 30 and simple.correct == 0


@pytest.mark.skipif(platform.python_version() != json.load(open(os.path.join(DATA, "manifest.json")))["python"],
                    reason="the sample is built from the standard library of the Python version in manifest.json")
def test_the_builder_reproduces_the_committed_sample_byte_for_byte(tmp_path, manifest):
    build.build_sample(str(tmp_path), seed=manifest["seed"])
    for relative in [*manifest["files"], "manifest.json"]:
        with open(tmp_path / relative, "rb") as a, open(os.path.join(DATA, relative), "rb") as b:
            assert a.read() == b.read(), relative
