"""Function calling on BFCL: its files loaded and selected, a model's answers to single-turn questions (each
question's prompt in the model's chat template, greedy batched decoding) and to multi-turn ones
(`eval.multi_turn`), scored by BFCL's checkers (`eval.bfcl`), and the per-question records. Used by the trainer's
evaluation hook and by the evaluate CLI."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath
from jax.sharding import Mesh

from hephaestus_jax import inference
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.data import forge
from hephaestus_jax.eval import bfcl, bfcl_checker, multi_turn
from hephaestus_jax.eval.tool_docs import bfcl_tools
from hephaestus_jax.eval.bfcl_files import (BFCLFormatError, GroundTruth, Prediction, Question, canonical_category,
                                            is_multi_turn, load_answers, load_questions)

if TYPE_CHECKING:
    from hephaestus_jax.data.chat_format import ChatRenderer  # Imports TensorFlow; only rendering needs it.


log = logging.getLogger("hephaestus_jax.eval.function_calling")

BFCL_FILE_GLOBS = ("BFCL_v3_*.json", "BFCL_v4_*.json")
NOT_RUN_HERE = ("web_search", "memory", "format_sensitivity")
"""BFCL categories (the start of a file's category name) that a directory of BFCL files may hold but that do not
run here (docs/bfcl.md): their files are skipped, with a log line."""
ANSWERS_SUBDIR = "possible_answer"


# ------------------------------------------------------------------------------------------------ BFCL


def load_bfcl(dataset: str, answers: str | None = None) -> tuple[list[Question], dict[str, GroundTruth]]:
    """Questions and ground truths from BFCL files or directories.

    A `dataset` directory means every BFCL_v3_*.json and BFCL_v4_*.json in it (bfcl-eval's data directory among
    them) but those of NOT_RUN_HERE categories, with answers by default from its possible_answer/ folder when
    there is one (the irrelevance categories need none); an `answers` directory means the same files in it.
    Question ids must be unique across files.
    """
    if answers is None and (epath.Path(dataset) / ANSWERS_SUBDIR).is_dir():
        answers = os.fspath(epath.Path(dataset) / ANSWERS_SUBDIR)
    questions: list[Question] = []
    seen: set[str] = set()
    for path in _bfcl_files(dataset):
        for question in load_questions(path):
            if question.id in seen:
                raise BFCLFormatError(path, f"question id {question.id!r} appears in more than one file")
            seen.add(question.id)
            questions.append(question)
    ground_truths: dict[str, GroundTruth] = {}
    for path in _bfcl_files(answers) if answers is not None else ():
        ground_truths.update(load_answers(path))
    return questions, ground_truths


_FILE_CATEGORY = re.compile(r"BFCL_v\d+_(?P<category>.+)\.json")


def _bfcl_files(path: str) -> list[str]:
    """The BFCL files that `path` names: the file itself, or every BFCL_v3/v4_*.json of a directory (local or gs://)
    but those of NOT_RUN_HERE categories."""
    location = epath.Path(path)
    if location.is_dir():
        files = sorted(os.fspath(p) for pattern in BFCL_FILE_GLOBS for p in location.glob(pattern))
        if not files:
            raise FileNotFoundError(f"{path}: no {' or '.join(BFCL_FILE_GLOBS)} files in this directory")
        skipped = [file for file in files
                   if _FILE_CATEGORY.fullmatch(os.path.basename(file))["category"].startswith(NOT_RUN_HERE)]
        if skipped:
            log.info("%s: skipping %s (not single-turn categories)", path,
                         ", ".join(os.path.basename(file) for file in skipped))
        return [file for file in files if file not in skipped]
    if not location.is_file():
        raise FileNotFoundError(f"{path}: no such BFCL file or directory")
    return [path]


def select_questions(questions: Sequence[Question], categories: Sequence[str] = (),
                     limit: int | None = None) -> list[Question]:
    """The questions of `categories` (all when empty; each must have questions), at most `limit` per category,
    in their original order."""
    wanted = {canonical_category(category) for category in categories}
    empty = sorted(wanted - {question.category for question in questions})
    if empty:
        raise ValueError(f"no questions of categories {empty}")
    counts: dict[str, int] = {}
    selected = []
    for question in questions:
        if wanted and question.category not in wanted:
            continue
        counts[question.category] = counts.get(question.category, 0) + 1
        if limit is None or counts[question.category] <= limit:
            selected.append(question)
    return selected


def sample_questions(questions: Sequence[Question], per_category: int, seed: int) -> list[Question]:
    """A seed-chosen subset: `per_category` questions of each category drawn without replacement (all of a
    smaller category), in their original order. The same seed and questions give the same subset."""
    if per_category < 1:
        raise ValueError(f"per_category must be positive, got {per_category}")
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for category in sorted({question.category for question in questions}):
        ids = [question.id for question in questions if question.category == category]
        chosen.update(ids[i] for i in rng.permutation(len(ids))[:per_category])
    return [question for question in questions if question.id in chosen]


def bfcl_prompt(question: Question, renderer: ChatRenderer) -> np.ndarray:
    """The question as a chat with its functions as bfcl-eval shows them to a function-calling model (its
    language-specific notes and, for Java and JavaScript, string parameters: `bfcl_checker.shown_functions`; then
    JSON-schema types, `tool_doc`), rendered by `renderer` (the model's own template, or a fallback), ending in an
    open assistant turn."""
    from hephaestus_jax.data.chat_format import render_chat_prompt  # lazy: imports seqio (TensorFlow).

    if len(question.turns) != 1:
        raise ValueError(f"question {question.id!r} has {len(question.turns)} turns; only single-turn categories "
                         "are supported")
    where = f"question {question.id!r}"
    tools = bfcl_tools(bfcl_checker.shown_functions(question), where)
    messages = tuple(forge.Message(role=message["role"], content=message["content"])
                     for message in question.turns[0])
    try:
        return render_chat_prompt(messages, tools, renderer)
    except forge.ForgeFormatError as e:
        raise ValueError(f"{where}: {e}") from None


def predict_function_calls(config: ModelConfig, params: Any, renderer: ChatRenderer,
                           questions: Sequence[Question], *, max_new_tokens: int, batch_size: int,
                           mesh: Mesh | None = None) -> dict[str, str]:
    """Greedy completion (text up to the first stop token) of every question's prompt, by question id."""
    vocab = renderer.vocab
    prompts = [bfcl_prompt(question, renderer) for question in questions]
    completions = inference.complete(config, params, prompts, max_new_tokens=max_new_tokens,
                                     stop_ids=inference.stop_ids_of(vocab), mesh=mesh,
                                     batch_size=batch_size)
    return {question.id: vocab.decode(tokens.tolist()) for question, tokens in zip(questions, completions)}


def predict(config: ModelConfig, params: Any, renderer: ChatRenderer, questions: Sequence[Question], *,
            max_new_tokens: int, batch_size: int, mesh: Mesh | None = None,
            step_limit: int = multi_turn.MAXIMUM_STEP_LIMIT) -> dict[str, Prediction]:
    """The model's answers to `questions`, by id: a single-turn question's raw output text, a multi-turn
    question's conversation (`multi_turn.run_multi_turn`, at most `step_limit` steps a turn, each step up to
    `max_new_tokens`)."""
    single = [question for question in questions if not is_multi_turn(question.category)]
    multi = [question for question in questions if is_multi_turn(question.category)]
    predictions: dict[str, Prediction] = {}
    if single:
        predictions.update(predict_function_calls(config, params, renderer, single, max_new_tokens=max_new_tokens,
                                                  batch_size=batch_size, mesh=mesh))
    if multi:
        complete = multi_turn.model_completer(config, params, renderer.vocab, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, mesh=mesh)
        predictions.update(multi_turn.run_multi_turn(multi, renderer, complete,
                                                     context_length=config.max_position_embeddings,
                                                     step_limit=step_limit))
    return predictions


def function_calling_accuracy(config: ModelConfig, params: Any, renderer: ChatRenderer,
                              questions: Sequence[Question], answers: Mapping[str, GroundTruth], *,
                              max_new_tokens: int, batch_size: int, limit: int | None = None,
                              mesh: Mesh | None = None) -> bfcl.Report:
    """BFCL accuracy of the model on (the first `limit` per category of) `questions`, decoding greedily."""
    selected = select_questions(questions, limit=limit)
    predictions = predict(config, params, renderer, selected, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          mesh=mesh)
    return bfcl.score(selected, answers, predictions)


def write_records(path: str, report: bfcl.Report) -> None:
    """One JSON line per question (`bfcl.ItemResult.record`): what the model said, step by step, and BFCL's
    verdict; `--predictions` re-scores such a file without a model."""
    epath.Path(path).write_text("".join(json.dumps(item.record(), ensure_ascii=False) + "\n"
                                        for item in report.items))


def records_path(results_path: str) -> str:
    """Where the per-question records of a results file go: results.json -> results.records.jsonl."""
    return os.fspath(epath.Path(results_path).with_suffix("")) + ".records.jsonl"
