"""Evaluation: held-out loss (library on 1 vs 8 devices, CLI vs a direct per-document computation) and BFCL
function calling (prompts, scoring predictions, a tiny model end to end)."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import evaluate, inference, losses, sharding
from hephaestus_jax.config import MeshConfig, ModelConfig
from hephaestus_jax.data import chat_format, forge, mixtures
from hephaestus_jax.data.vocab import default_tokenizer_path, load_vocabulary
from hephaestus_jax.eval import bfcl, bfcl_files, function_calling, heldout
from hephaestus_jax.model import llama

BFCL_DIR = Path(__file__).parent / "fixtures" / "bfcl"
SMALL = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_position_embeddings=128)
LLAMA3_TINY = ModelConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary(default_tokenizer_path())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with the real Llama-3 vocabulary as an Orbax checkpoint (chunked loss logits)."""
    from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
    from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

    root = tmp_path_factory.mktemp("llama3_tiny")
    write_random_hf_checkpoint(LLAMA3_TINY, str(root / "hf"), seed=2)
    convert_hf_to_orbax(str(root / "hf"), str(root / "ckpt"), logits_chunk_size=64)
    return str(root / "ckpt")


# ------------------------------------------------------------------------------------------------ held-out loss


def _random_batch(rng, rows=8, seq_len=24):
    segment_ids = np.ones((rows, seq_len), np.int32)
    segment_ids[:, seq_len // 2:] = 2
    segment_ids[-2:] = 0  # Two padding rows.
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)) % (seq_len // 2)
    weights = (rng.random((rows, seq_len)) > 0.3).astype(np.int32) * (segment_ids > 0)
    return {"inputs": rng.integers(0, 300, (rows, seq_len), dtype=np.int32),
            "targets": rng.integers(0, 300, (rows, seq_len), dtype=np.int32),
            "positions": positions, "segment_ids": segment_ids, "loss_weights": weights}


def test_heldout_losses_on_eight_devices_equal_one_device_and_a_direct_sum():
    rng = np.random.default_rng(0)
    streams = {"forge_code": [_random_batch(rng), _random_batch(rng)], "forge_text": [_random_batch(rng)]}
    params = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), llama.abstract_params(SMALL))
    one = sharding.make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    eight = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    placed = jax.device_put(params, sharding.logical_to_sharding(llama.param_axes(SMALL), eight))
    on_one = heldout.heldout_losses(SMALL, params, streams, one)
    on_eight = heldout.heldout_losses(SMALL, placed, streams, eight)
    assert on_one.keys() == on_eight.keys() == {"eval/loss/forge_code", "eval/tokens/forge_code",
                                                "eval/loss/forge_text", "eval/tokens/forge_text", "eval/loss"}
    for key, value in on_one.items():
        np.testing.assert_allclose(on_eight[key], value, rtol=1e-5, err_msg=key)

    direct = jax.jit(lambda p, b: losses.batch_loss_sums(SMALL, p, b))
    sums = {name: [direct(params, batch) for batch in batches] for name, batches in streams.items()}
    nll = {name: sum(float(s["nll"]) for s in values) for name, values in sums.items()}
    weight = {name: sum(float(s["weight"]) for s in values) for name, values in sums.items()}
    for name in streams:
        assert on_one[f"eval/tokens/{name}"] == weight[name] == sum(b["loss_weights"].sum() for b in streams[name])
        np.testing.assert_allclose(on_one[f"eval/loss/{name}"], nll[name] / weight[name], rtol=1e-5)
    np.testing.assert_allclose(on_one["eval/loss"], sum(nll.values()) / sum(weight.values()), rtol=1e-5)

    first_only = heldout.heldout_losses(SMALL, params, streams, one, max_batches=1)
    assert first_only["eval/tokens/forge_code"] == float(sums["forge_code"][0]["weight"])


def _write_forge_validation(root):
    """A tiny Forge tree: only validation files, a few short documents per stage-I component."""
    tool = {"name": "get_weather", "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    records = {
        "tool_docs": [tool, {**tool, "name": "get_time", "description": "The local time in a city."}],
        "trajectories": [{"query": "Weather in Oslo?", "tools": [tool], "final_answer": "It is 3 degrees.",
                          "steps": [{"thought": "Look it up.", "call": {"name": "get_weather",
                                                                         "arguments": {"city": "Oslo"}},
                                     "observation": {"temp": 3}}]}],
        "code": [{"text": "def add(a, b):\n    return a + b\n", "language": "python"},
                 {"text": "print('hello')\n", "language": "python"}],
        "text": [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Agents call tools."},
                 {"text": "Held-out text is never trained on."}],
    }
    paths = {}
    for component, items in records.items():
        directory = root / component
        directory.mkdir(parents=True)
        paths[component] = directory / "validation-00000-of-00001.jsonl"
        paths[component].write_text("".join(json.dumps(item) + "\n" for item in items))
    return paths


def test_loss_cli_equals_a_per_document_computation(tmp_path, checkpoint, vocab, capsys):
    paths = _write_forge_validation(tmp_path / "forge")
    seq_len = 256
    gin_file = tmp_path / "eval.gin"
    gin_file.write_text(f"ForgeFiles.data_dir = {str(tmp_path / 'forge')!r}\nDataConfig.mixture = 'forge_stage1'\n"
                        f"DataConfig.seq_len = {seq_len}\nMeshConfig.fsdp = -1\nTrainConfig.batch_size = 4\n")
    output = tmp_path / "losses.jsonl"
    try:  # Rows per batch: TrainConfig.batch_size (4), padded to the 8 devices.
        assert evaluate.main(["loss", "--gin_file", str(gin_file), "--checkpoint_dir", checkpoint,
                              "--output", str(output)]) == 0
    finally:
        gin.clear_config()
    (written,) = [json.loads(line) for line in output.read_text().splitlines()]
    printed = capsys.readouterr().out
    assert written["step"] == 0 and "forge_trajectories" in printed

    stored = ckpt.StoredCheckpoint(checkpoint, 0)
    config = stored.model_config
    params = stored.restore_params(config)
    forward = jax.jit(lambda p, b: losses.batch_loss_sums(config.replace(logits_chunk_size=0), p, b))
    for component, path in paths.items():
        renderer = chat_format.resolve_chat_format(vocab)
        documents = [chat_format.render_document(record, renderer) for record in forge.read_records(str(path), component)]
        assert sum(d.tokens.size - 1 for d in documents) <= seq_len  # One row: no document is split.
        nll = weight = 0.0
        for document in documents:  # Alone in a row; padded at the end (never attended to) to one shape.
            n = document.tokens.size - 1
            pad = lambda a: np.pad(a, (0, seq_len - n))[None]
            sums = forward(params, {"inputs": pad(document.tokens[:-1]), "targets": pad(document.tokens[1:]),
                                    "positions": pad(np.arange(n)), "segment_ids": pad(np.ones(n, np.int32)),
                                    "loss_weights": pad(document.loss_mask[1:])})
            nll, weight = nll + float(sums["nll"]), weight + float(sums["weight"])
        name = mixtures.task_name(component)
        assert written[f"eval/tokens/{name}"] == weight == sum(d.loss_mask[1:].sum() for d in documents)
        np.testing.assert_allclose(written[f"eval/loss/{name}"], nll / weight, rtol=2e-5)
        assert 11 < written[f"eval/loss/{name}"] < 12.5  # A random model: about log(128256) = 11.76.


def test_loss_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    gin_file = tmp_path / "eval.gin"
    gin_file.write_text(f"ForgeFiles.data_dir = {str(tmp_path)!r}\n")
    try:
        assert evaluate.main(["loss", "--gin_file", str(gin_file), "--checkpoint_dir", str(tmp_path / "none")]) == 2
    finally:
        gin.clear_config()
    assert "does not exist" in capsys.readouterr().err


def test_loss_cli_names_a_stage_files_placeholder_before_reading_anything(tmp_path, capsys):
    try:  # The checkpoint does not exist either: the placeholder is found first.
        assert evaluate.main(["loss", "--gin_file", "configs/stage1_cpt.gin",
                              "--checkpoint_dir", str(tmp_path / "none")]) == 2
    finally:
        gin.clear_config()
    assert "ForgeFiles.data_dir='gs://YOUR_BUCKET/forge'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ BFCL


def _score_fixtures(categories=()):
    questions = [q for path in sorted(BFCL_DIR.glob("BFCL_v3_*.json")) for q in bfcl_files.load_questions(path)]
    if categories:
        questions = [q for q in questions if q.category in categories]
    answers = {}
    for path in sorted((BFCL_DIR / "possible_answer").glob("BFCL_v3_*.json")):
        answers.update(bfcl_files.load_answers(path))
    predictions = bfcl_files.load_predictions(BFCL_DIR / "predictions.jsonl")
    predictions = {k: v for k, v in predictions.items() if not categories or bfcl_files.categorize(k) in categories}
    return bfcl.score(questions, answers, predictions)


@pytest.mark.parametrize("categories", [(), ("simple", "parallel_multiple")])
def test_predictions_cli_gives_the_numbers_of_bfcl_score(tmp_path, capsys, categories):
    output = tmp_path / "results.json"
    argv = ["function_calling", "--predictions", str(BFCL_DIR / "predictions.jsonl"), "--dataset", str(BFCL_DIR),
            "--output", str(output), *[a for c in categories for a in ("--category", c)]]
    assert evaluate.main(argv) == 0
    expected = _score_fixtures(categories)
    results = json.loads(output.read_text())
    assert results["report"] == expected.to_dict()
    assert [c["accuracy"] for c in results["report"]["categories"].values()] != [1.0] * len(expected.categories)
    assert bfcl.format_table(expected) in capsys.readouterr().out


def test_loading_a_single_file_and_selecting_per_category():
    questions, answers = function_calling.load_bfcl(str(BFCL_DIR / "BFCL_v3_simple.json"),
                                            str(BFCL_DIR / "possible_answer" / "BFCL_v3_simple.json"))
    assert [q.id for q in questions] == list(answers) == ["simple_0", "simple_1", "simple_2"]
    everything, _ = function_calling.load_bfcl(str(BFCL_DIR))
    picked = function_calling.select_questions(everything, ["simple", "live_simple"], limit=2)
    assert [q.id for q in picked] == ["live_simple_0-0-0", "live_simple_1-1-0", "simple_0", "simple_1"]
    with pytest.raises(ValueError, match="no questions of categories \\['java'\\]|unsupported BFCL category"):
        function_calling.select_questions(everything, ["java"])
    with pytest.raises(ValueError, match=r"no questions of categories \['multiple'\]"):
        function_calling.select_questions(questions, ["multiple"])


def test_sample_questions_is_a_seeded_subset_per_category_in_file_order():
    everything, _ = function_calling.load_bfcl(str(Path(__file__).parent.parent / "data" / "eval"))
    picked = function_calling.sample_questions(everything, 4, seed=0)
    counts = {}
    for question in picked:
        counts[question.category] = counts.get(question.category, 0) + 1
    assert counts == {c: 4 for c in ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")}
    assert picked == [q for q in everything if q in picked]  # original order
    assert picked == function_calling.sample_questions(everything, 4, seed=0)
    assert picked != function_calling.sample_questions(everything, 4, seed=1)
    assert [q.id for q in picked] != [q.id for q in function_calling.select_questions(everything, limit=4)]
    assert len(function_calling.sample_questions(everything, 1000, seed=0)) == len(everything)
    with pytest.raises(ValueError, match="per_category must be positive"):
        function_calling.sample_questions(everything, 0, seed=0)


def test_duplicate_question_ids_across_files_are_rejected(tmp_path):
    line = (BFCL_DIR / "BFCL_v3_simple.json").read_text().splitlines()[0]
    (tmp_path / "BFCL_v3_simple.json").write_text(line + "\n")
    (tmp_path / "BFCL_v3_simple_copy.json").write_text(line + "\n")
    with pytest.raises(bfcl_files.BFCLFormatError, match="simple_0.*more than one file"):
        function_calling.load_bfcl(str(tmp_path))


def test_bfcl_prompt_lists_the_functions_as_json_schema_tools(vocab):
    questions, _ = function_calling.load_bfcl(str(BFCL_DIR / "BFCL_v3_live_multiple.json"))
    question = questions[1]
    prompt = function_calling.bfcl_prompt(question, chat_format.resolve_chat_format(vocab))
    text = vocab.decode(prompt.tolist())
    assert prompt[0] == vocab.bos_id and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert '"name": "ChaDri.change_drink"' in text and '"type": "object"' in text and '"dict"' not in text
    assert text.count("Note that the provided function is in Python 3 syntax.") == len(question.functions)  # BFCL's
    assert "Environment: ipython" in text and question.turns[0][-1]["content"] in text
    assert question.functions[0]["parameters"]["type"] == "dict"  # The scored question is left as it was.


def test_function_calling_end_to_end_with_a_tiny_model(tmp_path, checkpoint, vocab, capsys):
    output = tmp_path / "results.json"
    assert evaluate.main(["function_calling", "--checkpoint_dir", checkpoint, "--dataset", str(BFCL_DIR),
                          "--output", str(output), "--max_new_tokens", "8", "--batch_size", "8"]) == 0
    results = json.loads(output.read_text())
    report = results["report"]
    questions, _ = function_calling.load_bfcl(str(BFCL_DIR))
    assert report["total"] == len(questions) and report["missing"] == 0
    assert set(report["categories"]) == {q.category for q in questions}
    assert results["run"]["step"] == 0 and 0 <= report["micro_accuracy"] <= 1
    irrelevance = report["categories"]["irrelevance"]
    assert irrelevance["correct"] == irrelevance["total"]  # Random text never decodes as a call.

    records_file = tmp_path / "results.records.jsonl"
    assert results["run"]["records"] == str(records_file)
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert [record["id"] for record in records] == [item["id"] for item in report["items"]]
    for record, item in zip(records, report["items"]):
        ((step,),) = record["turns"]  # Single-turn: one turn of one step, its raw text and what it decoded to.
        assert isinstance(step["text"], str) and (record["correct"], record["reason"]) == (item["correct"],
                                                                                        item["reason"])
    rescored = tmp_path / "rescored.json"
    assert evaluate.main(["function_calling", "--predictions", str(records_file), "--dataset", str(BFCL_DIR),
                          "--output", str(rescored)]) == 0
    assert json.loads(rescored.read_text())["report"] == report
    assert (tmp_path / "rescored.records.jsonl").read_text() == records_file.read_text()

    loaded = inference.load_model(checkpoint)  # The library entry point gives the same report.
    questions, answers = function_calling.load_bfcl(str(BFCL_DIR))
    library = function_calling.function_calling_accuracy(loaded.config, loaded.params,
                                                         chat_format.resolve_chat_format(vocab), questions, answers,
                                                 max_new_tokens=8, batch_size=8, mesh=loaded.mesh)
    assert library.to_dict() == report


def _bigram_model(chain: list[int], vocab_size: int) -> tuple[ModelConfig, dict]:
    """A Llama whose layers add nothing (zero output projections), so that a position's logits depend on its own
    token alone: token chain[k] predicts chain[k + 1] (the tokens must be distinct)."""
    assert len(set(chain)) == len(chain)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=2048)
    assert len(chain) <= config.hidden_size
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), llama.abstract_params(config))
    for norm in (params["final_norm"], params["layers"]["attn_norm"], params["layers"]["mlp_norm"]):
        norm["scale"][...] = 1.0
    for k, (token, following) in enumerate(zip(chain, chain[1:])):
        params["embed"][token, k] = 1.0
        params["lm_head"][following, k] = 10.0
    return config, params


def test_in_loop_function_calling_accuracy_scores_what_the_model_generates(vocab):
    """The trainer's in-loop score (function_calling_accuracy) of a real model, decoding greedily, that answers
    every question with one call: the score of that text (simple_2 right, the irrelevance categories wrong),
    not that of empty answers."""
    questions, answers = function_calling.load_bfcl(str(BFCL_DIR))
    answer = "[math.factorial(number=5)]"
    renderer = chat_format.resolve_chat_format(vocab)
    [opening] = {int(function_calling.bfcl_prompt(q, renderer)[-1]) for q in questions}  # "\n\n" of the header.
    config, params = _bigram_model([opening, *vocab.encode(answer), vocab.stop_ids[0]], vocab.vocab_size)
    report = function_calling.function_calling_accuracy(config, params, renderer, questions, answers, max_new_tokens=16,
                                                        batch_size=8).to_dict()
    assert report == bfcl.score(questions, answers, {q.id: answer for q in questions}).to_dict()
    assert report != bfcl.score(questions, answers, {q.id: "" for q in questions}).to_dict()
    assert report["categories"]["simple"]["correct"] == 1 and report["categories"]["irrelevance"]["correct"] == 0


def test_function_calling_scores_what_the_model_generates(tmp_path, checkpoint, vocab, monkeypatch):
    """A deterministic stand-in for decoding emits, for each question's exact prompt, the text of the fixture's
    predictions (right and wrong calls in every format; "" where the fixture holds decoded calls, not text): the
    CLI must report the same numbers as scoring those texts directly, so the score depends on the model's output."""
    questions, answers = function_calling.load_bfcl(str(BFCL_DIR))
    fixture = bfcl_files.load_predictions(BFCL_DIR / "predictions.jsonl")
    texts = {q.id: fixture[q.id] for q in questions if isinstance(fixture.get(q.id), str)}
    renderer = chat_format.resolve_chat_format(vocab)
    by_prompt = {tuple(function_calling.bfcl_prompt(q, renderer).tolist()): vocab.encode(texts.get(q.id, ""))
                 for q in questions}

    def scripted(config, params, prompts, *, max_new_tokens, batch_size, **_):
        return [np.asarray(by_prompt[tuple(np.asarray(prompt).tolist())][:max_new_tokens], np.int32)
                for prompt in prompts]

    monkeypatch.setattr(inference, "complete", scripted)
    output = tmp_path / "results.json"
    assert evaluate.main(["function_calling", "--checkpoint_dir", checkpoint, "--dataset", str(BFCL_DIR),
                          "--output", str(output), "--max_new_tokens", "256", "--batch_size", "4"]) == 0
    report = json.loads(output.read_text())["report"]
    assert (tmp_path / "results.records.jsonl").exists()
    expected = bfcl.score(questions, answers, {q.id: texts.get(q.id, "") for q in questions})
    assert report == expected.to_dict()
    assert 0 < expected.micro_accuracy < 1  # Some calls right, some wrong: neither all-empty nor all-correct.


def test_scoring_predictions_writes_nothing_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["function_calling", "--predictions", str(BFCL_DIR / "predictions.jsonl"),
                          "--dataset", str(BFCL_DIR)]) == 0
    assert bfcl.format_table(_score_fixtures()) in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_model_run_without_output_is_refused_before_anything_loads(tmp_path, capsys):
    """A model's run always keeps its records: without --output it stops at once (the checkpoint does not even
    exist here), with one line and exit 2."""
    assert evaluate.main(["function_calling", "--checkpoint_dir", str(tmp_path / "none"),
                          "--dataset", str(BFCL_DIR)]) == 2
    err = capsys.readouterr().err
    assert "--output is required with --checkpoint_dir" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


LLAMA3_LONG = dataclasses.replace(LLAMA3_TINY, max_position_embeddings=8192)


def test_function_calling_runs_each_bfcl_multi_turn_category_through_the_cli(tmp_path):
    """`evaluate function_calling` on the first question of each multi-turn category of bfcl-eval's data (a tiny
    random model: every turn ends at its first step): it runs every turn, writes one record per question, its
    verdicts are bfcl-eval's multi_turn_checker's on the records' texts, and --predictions re-scores the records
    to the same report."""
    bfcl_eval = pytest.importorskip("bfcl_eval", reason="pip install --no-deps bfcl-eval (README's test command)")
    from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
    from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint
    from support.bfcl_multi_turn import bfcl_verdict

    write_random_hf_checkpoint(LLAMA3_LONG, str(tmp_path / "hf"), seed=3)
    convert_hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    data = tmp_path / "bfcl"  # bfcl-eval's multi-turn files alone (its whole data directory loads in seconds more).
    for name in [f"BFCL_v4_{category}.json" for category in bfcl_files.MULTI_TURN_CATEGORIES]:
        for folder in ("", "possible_answer"):
            (data / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(os.path.dirname(bfcl_eval.__file__), "data", folder, name), data / folder / name)
    data = str(data)
    categories = [a for c in bfcl_files.MULTI_TURN_CATEGORIES for a in ("--category", c)]
    output = tmp_path / "results.json"
    assert evaluate.main(["function_calling", "--checkpoint_dir", str(tmp_path / "ckpt"), "--dataset", data,
                          *categories, "--limit", "1", "--max_new_tokens", "4", "--max_steps", "1",
                          "--batch_size", "4", "--output", str(output)]) == 0
    report = json.loads(output.read_text())["report"]
    assert set(report["categories"]) == set(bfcl_files.MULTI_TURN_CATEGORIES) and report["missing"] == 0
    questions, answers = function_calling.load_bfcl(data)
    by_id = {question.id: question for question in questions}
    records = [json.loads(line) for line in (tmp_path / "results.records.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        question = by_id[record["id"]]
        assert "error" not in record and len(record["turns"]) == len(question.turns)  # Every turn was run.
        texts = [[step["text"] for step in turn] for turn in record["turns"]]
        assert (record["correct"], record["error_type"]) == bfcl_verdict(question, answers[record["id"]], texts)
    rescored = tmp_path / "rescored.json"
    assert evaluate.main(["function_calling", "--predictions", str(tmp_path / "results.records.jsonl"),
                          "--dataset", data, *categories, "--limit", "1", "--output", str(rescored)]) == 0
    assert json.loads(rescored.read_text())["report"] == report
